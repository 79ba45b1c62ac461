"""Real tissue: does fine-tuning on a lab's own points beat a textbook detector? (issue #33, acceptance)

``python -m benchmarks.real_tile_labels [--iterations 160] [--stain-jitter strong] [--sigma-um 1.5,2.5,3.5]
[--lr-max 1e-3,3e-3] [--points all,100,50,25] [--seeds 0,1,2] [--cache inner.json] [--select-only]
[--select-by strip] [--select-seeds 0] [--tta off] [--pool off] [--cycles 3] [--models DIR]``
(the defaults: the README's second selection stage and its test runs)

The one real labelled H&E at hand (``../shared/fixtures/real-he-hgsc-stroma``: 1500 x 1500 px at about
0.5 µm/px, 423 nucleus points) is cut into a training half (x < 750 px) and a test half. Every choice is
made on the training half, which is cut again by y into an inner training part (y < 1000 px) and an inner
validation strip:

1. *Selection.* For each candidate setting (the product of the comma lists ``--iterations``,
   ``--stain-jitter``, ``--sigma-um``, ``--lr-max``, ``--cycles``) the shipped nuclei ensemble is fine-tuned
   (``pdl1 train nuclei ... --labels``: same code) on the inner training part's points, and scored on the inner
   validation strip, where its peak threshold ``min_score`` is fitted too (:func:`inference.fit_min_score`, as ``pdl1
   train --recalibrate`` does on held-out slides). The setting with the best inner-validation F1 wins, with
   its fitted threshold. The LoG baseline, tuned on the inner training part, is scored on the same strip.
2. *Test, once per final model.* The winner is fine-tuned again on a strip of the whole training half
   holding N points (``--points``; ``all``: the half), for each seed, and scored on the test half at the
   threshold chosen in 1. Beside it: the baseline, Laplacian-of-Gaussian blobs on the colour-deconvolved
   haematoxylin channel, its sigmas and threshold tuned on the whole training half, and the shipped
   phantom-trained ensemble as it is.

Nothing is chosen on the test half, and no threshold is fitted there: the models are trained by
:func:`train_nuclei` directly, so ``pdl1 train``'s recalibration on ``--val-entries`` never sees it.
Detection F1 within 3 µm, class-agnostic. Labels pass through ``bridge.labels`` exactly as a QuPath
export does; the fixture's classes (connective, inflammatory, neoplastic) are mapped onto the model's
(Other, Other, Tumor: Negative). ``--cache`` keeps the selection's scores per candidate, so a later run
(say, with more seeds) reuses them instead of training the candidates again. CPU minutes per model.

A less noisy selection: ``--select-by cv2`` scores each candidate by 2-fold cross-validation within the
training half instead (train on y < 750 px, score y >= 750 px, and the other way round: every training
point is scored once), ``--select-seeds`` trains each fold with several seeds; the F1 and the threshold
fit are pooled over folds and seeds. ``--tta off,on`` makes test-time augmentation (``NucleiConfig.tta``:
the 8 flips and rotations) a candidate too, chosen on the training half with its own threshold; the test
half then shows each final model with and without it. ``--models DIR`` keeps every model trained, and a
later run scores the ones already there instead of training them again.

``--pool off,on`` makes pooling the seeds a candidate too: ``on`` scores, in place of each seed's model, one
ensemble holding the members of all of them (:func:`pool_members`; in the selection the ``--select-seeds``
models of each fold, on the test half the ``--seeds`` models), with its own fitted threshold; ``off`` is each
seed's model alone. The pooled folder is laid out as ``pdl1 train seg --chains`` writes one (chain k: the
k-th seed's members), and the product loads it as any ensemble: its heatmap is the mean over all members.

How clear is a lead on one tile? ``--bootstrap N`` adds a paired block bootstrap on the test half: the half
is cut into squares of ``--block-px`` (level-0 px), each detector's matches are counted per square, and the
squares are drawn with replacement N times; each draw scores each final model (at the chosen TTA and its
threshold: each seed's, and the pooled one with ``--pool on``) and the LoG on the same squares, so the
interval of their F1 difference keeps what they have in common (the same hard and easy places) and the
spatial clumping of errors within a square.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import shapely

from bridge.labels import LabelRules, labels_from_objects, parse_class_map
from bridge.qupath_geojson import QuPathObject, read_features
from inference.analysis.nuclei import DEFAULT_MIN_SCORE, NucleiConfig
from inference.analysis.points import DetectionScores, detection_scores
from inference.evaluation.baselines import LogParams, log_nuclei
from inference.evaluation.labelled import fit_min_score, labelled_nuclei, score_labelled_nuclei
from inference.models.ensemble import demo_model_dir
from inference.models.manifest import Manifest, read_manifest, write_manifest
from inference.phantom.truth import NUCLEUS_CLASSES
from inference.slides.slide import open_slide
from inference.training.train_nuclei import NucleiTrainConfig, train_nuclei

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real-he-hgsc-stroma"
SLIDE = FIXTURE / "hgsc_stroma.svs"
POINTS = FIXTURE / "hgsc_stroma_nuclei.geojson"
CLASS_MAP = ("connective=Other", "inflammatory=Other", "neoplastic=Tumor: Negative")
SPLIT_X_PX = 750
INNER_SPLIT_Y_PX = 1000  # the training half's inner validation strip: y >= this (70 of its 192 points)
CV_SPLIT_Y_PX = 750  # --select-by cv2: the training half's two folds (98 and 94 points)
RADIUS_UM = 3.0
LOG_GRID = {
    "min_sigma_um": (1.0, 1.5, 2.0, 3.0, 4.0),
    "max_sigma_um": (3.0, 4.0, 6.0, 8.0),
    "threshold": (0.02, 0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.4),
}
RULES = LabelRules(class_names=tuple(NUCLEUS_CLASSES), class_map=parse_class_map(CLASS_MAP))
LOG_MPP = 1.0  # the baseline sees the pixels the nuclei model sees (1 µm/px), and runs 4x faster


def _score(pred_xy: np.ndarray, truth_xy: np.ndarray, *, radius_px: float) -> DetectionScores:
    zeros_p, zeros_t = np.zeros(len(pred_xy), np.int64), np.zeros(len(truth_xy), np.int64)
    overall, _ = detection_scores(pred_xy, zeros_p, truth_xy, zeros_t, radius=radius_px, n_classes=1)
    return overall


def _in_box(xy: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)


def run_log(rgb: np.ndarray, *, mpp: float, box: tuple[int, int, int, int], params: LogParams) -> np.ndarray:
    """LoG nuclei of ``box`` (level-0 px) of ``rgb`` (level 0, ``mpp``), read at :data:`LOG_MPP`; level-0 xy."""
    x0, y0, x1, y1 = box
    f = round(LOG_MPP / mpp)
    crop = rgb[y0:y1, x0:x1]
    h, w = crop.shape[0] // f * f, crop.shape[1] // f * f
    small = crop[:h, :w].reshape(h // f, f, w // f, f, 3).mean((1, 3)).round().astype(np.uint8)
    return log_nuclei(small, mpp=mpp * f, params=params) * f + (x0, y0)


def log_settings() -> Iterator[LogParams]:
    """Every LoG setting of :data:`LOG_GRID` whose largest sigma exceeds its smallest."""
    for lo, hi, thr in itertools.product(*LOG_GRID.values()):
        if hi > lo:
            yield LogParams(lo, hi, thr)


def tune_log(rgb: np.ndarray, truth_xy: np.ndarray, *, mpp: float, box: tuple[int, int, int, int]) -> LogParams:
    """The LoG parameters with the best F1 on ``box`` (level-0 px) of ``rgb`` (level 0)."""
    truth = truth_xy[_in_box(truth_xy, box)]
    best, best_f1 = LogParams(), -1.0
    for params in log_settings():
        f1 = _score(run_log(rgb, mpp=mpp, box=box, params=params), truth, radius_px=RADIUS_UM / mpp).f1
        if f1 > best_f1:
            best, best_f1 = params, f1
    return best


def block_counts(
    pred_xy: np.ndarray, truth_xy: np.ndarray, *, box: tuple[int, int, int, int], block_px: int, radius_px: float
) -> np.ndarray:
    """(squares, 3) matches, false and missed detections per ``block_px`` square of ``box``, each matched alone.

    Matching square by square loses a pair split by a square's edge; both detectors lose alike.
    """
    x0, y0, x1, y1 = box
    counts = []
    for bx, by in itertools.product(range(x0, x1, block_px), range(y0, y1, block_px)):
        square = (bx, by, min(bx + block_px, x1), min(by + block_px, y1))
        s = _score(pred_xy[_in_box(pred_xy, square)], truth_xy[_in_box(truth_xy, square)], radius_px=radius_px)
        counts.append((s.tp, s.fp, s.fn))
    return np.array(counts, dtype=np.int64).reshape(-1, 3)


def paired_block_bootstrap(
    a: np.ndarray, b: np.ndarray, *, n_boot: int, seed: int = 0
) -> tuple[float, float, float, float]:
    """F1(a) - F1(b) over the squares given, its 95 % percentile interval over ``n_boot`` paired draws of the
    squares, and the share of draws in which ``a`` leads (``a``, ``b``: :func:`block_counts` of one box).

    >>> a = np.array([[3, 0, 0], [2, 1, 1], [4, 0, 1]]); b = np.array([[2, 1, 1], [1, 2, 2], [3, 1, 2]])
    >>> d, lo, hi, share = paired_block_bootstrap(a, b, n_boot=500)
    >>> round(d, 3), lo <= d <= hi, share > 0.9
    (0.286, True, True)
    """

    def f1(counts: np.ndarray) -> np.ndarray:
        tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
        return 2 * tp / np.maximum(2 * tp + fp + fn, 1)

    idx = np.random.default_rng(seed).integers(0, len(a), (n_boot, len(a)))
    d = f1(a[idx].sum(1)) - f1(b[idx].sum(1))
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(f1(a.sum(0)) - f1(b.sum(0))), float(lo), float(hi), float((d > 0).mean())


def strip_with_points(truth_xy: np.ndarray, n: int | None, *, width_px: int, height_px: int) -> tuple[int, ...]:
    """A strip of the training half from its top, just tall enough to hold ``n`` points (all: the half)."""
    inside = truth_xy[truth_xy[:, 0] < width_px]
    if n is None or n >= len(inside):
        return (0, 0, width_px, height_px)
    y = np.sort(inside[:, 1])[n - 1]
    return (0, 0, width_px, int(np.ceil(y + 1)))


def _labels(objects: list[QuPathObject], box: tuple, *, rules: LabelRules, size: tuple[int, int]):
    """The points in ``box`` under one ``Training region (all nuclei marked)``, as a QuPath export gives them."""
    region = QuPathObject(shapely.box(*box), "annotation", "Training region", {}, "Training region (all nuclei marked)")
    kept = [o for o in objects if _in_box(np.array([[o.geometry.x, o.geometry.y]]), box)[0]]
    return labels_from_objects(
        [region, *kept], slide=str(SLIDE), image_size_px=size, rules=rules, source=f"{POINTS} in {box}"
    )


class _Rows(list):
    """The table's rows, each printed as it comes, so a long run shows (and keeps) what it has measured."""

    def append(self, row: tuple[str, int, DetectionScores, float]) -> None:
        what, n_points, s, seconds = row
        print(f"| {what} | {n_points} | {s.precision:.3f} | {s.recall:.3f} | {s.f1:.3f} | {seconds:.0f} |", flush=True)
        super().append(row)


@dataclass(frozen=True)
class Setting:
    """One candidate fine-tuning setting (the rest as in :func:`_config`)."""

    iterations: int
    stain_jitter: str
    sigma_um: float
    lr_max: float
    cycles: int = 3  # the first cycle's member dropped: cycles - 1 members
    init: str | None = None  # the model fine-tuned from (None: the shipped ensemble)

    def __str__(self) -> str:
        more = "" if self.cycles == 3 else f", {self.cycles} cycles"
        more += "" if self.init is None else f", from {Path(self.init).name}"
        return (
            f"{self.iterations} it/epoch, {self.stain_jitter} jitter, sigma {self.sigma_um:g} µm, "
            f"lr {self.lr_max:g}{more}"
        )

    def key(self) -> dict:
        """The fields naming this setting in ``--cache`` (the earlier runs' keys, without ``cycles`` or ``init``,
        stay valid)."""
        defaults = {"cycles": 3, "init": None}
        return {k: v for k, v in asdict(self).items() if k not in defaults or v != defaults[k]}


def _config(setting: Setting, *, out: Path, seed: int) -> NucleiTrainConfig:
    """Fine-tuning from the shipped ensemble: cycles of 2 epochs, batch 8 (the first cycle's member dropped)."""
    return NucleiTrainConfig(
        slides=(str(SLIDE),),
        out_dir=str(out),
        init_model=setting.init or str(demo_model_dir("nuclei")),
        cycles=setting.cycles,
        epochs_per_cycle=2,
        iterations_per_epoch=setting.iterations,
        batch_size=8,
        sigma_um=setting.sigma_um,
        lr_max=setting.lr_max,
        lr_min=setting.lr_max / 100,
        stain_jitter=setting.stain_jitter,
        seed=seed,
    )


def trained_once(out: Path, train: Callable[[Path], None]) -> tuple[Path, float]:
    """The model ``train(out)`` writes in ``out``, and its training time (s); one already there is kept."""
    done = out / "train_seconds.json"
    if not done.exists():
        # A run stopped before its time was recorded is trained again from the start (its time is a figure here);
        # training refuses a folder holding an interrupted run's checkpoint.
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        train(out)
        done.write_text(json.dumps(time.perf_counter() - t0))
    return out, json.loads(done.read_text())


def _trained(setting: Setting, labels, *, out: Path, seed: int) -> tuple[Path, float]:
    """The model fine-tuned as ``setting`` on ``labels`` in ``out``, and its training seconds (:func:`trained_once`)."""
    return trained_once(out, lambda o: train_nuclei(_config(setting, out=o, seed=seed), labels=[labels]))


# What pooled models must share: the same network, fed and read out the same way.
_POOL_SAME = (
    "architecture",
    "architecture_kwargs",
    "input_mpp",
    "tile_size_px",
    "normalization",
    "class_names",
    "stain",
)


def pool_members(model_dirs: Sequence[Path], *, out: Path) -> Path:
    """One nuclei model folder ``out`` holding every member of ``model_dirs``, each an ensemble's folder.

    Laid out as ``pdl1 train seg --chains`` lays out its chains: the members of ``model_dirs[k]`` are copied to
    ``out/chain_k/`` and listed with ``chain`` k, so :meth:`Ensemble.load` verifies and loads them as one
    ensemble (its heatmap: the mean over all members). The rest of the manifest (thresholds, sigma, domain
    statistics) is the first folder's; ``training`` names the pooled folders. A folder already at ``out`` is
    replaced. Raises ``ValueError`` for models that differ in network, input or output (:data:`_POOL_SAME`).
    """
    manifests = [read_manifest(d, task="nuclei") for d in model_dirs]
    first = manifests[0]
    for d, m in zip(model_dirs, manifests, strict=True):
        differ = [k for k in _POOL_SAME if getattr(m, k) != getattr(first, k)]
        differ += [k for k in ("sigma_um", "output_stride") if m.extra.get(k) != first.extra.get(k)]
        if differ:
            raise ValueError(f"{d}: its {', '.join(differ)} differ from {model_dirs[0]}'s; pool models of one setting")
    shutil.rmtree(out, ignore_errors=True)
    members = []
    for chain, (d, m) in enumerate(zip(model_dirs, manifests, strict=True)):
        (out / f"chain_{chain}").mkdir(parents=True)
        for member in m.members:
            file = f"chain_{chain}/{Path(member.file).name}"
            shutil.copyfile(Path(d) / member.file, out / file)
            members.append(replace(member, file=file, chain=chain))
    pooled_from = [{"model": str(d), "checksum": m.checksum} for d, m in zip(model_dirs, manifests, strict=True)]
    write_manifest(out, Manifest(**{**asdict(first), "members": members, "training": {"pooled_from": pooled_from}}))
    return out


def _pooled_words(seeds: Sequence[int]) -> str:
    return f", seeds {'+'.join(map(str, seeds))} pooled"


def _slug(setting: Setting) -> str:
    more = "" if setting.cycles == 3 else f"_c{setting.cycles}"
    more += "" if setting.init is None else f"_from-{Path(setting.init).name}"
    return f"it{setting.iterations}_{setting.stain_jitter}_s{setting.sigma_um:g}_lr{setting.lr_max:g}{more}"


def _scores(s) -> DetectionScores:
    return DetectionScores(s.n_matched, s.n_predicted - s.n_matched, s.n_labelled - s.n_matched)


def _csv(text: str, kind: type) -> list:
    return [kind(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_tile_labels", description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", default="160", help="candidate iterations per epoch, comma-separated")
    parser.add_argument("--stain-jitter", default="strong", help="candidate colour augmentations")
    parser.add_argument(
        "--sigma-um", default="1.5,2.5,3.5", help="candidate Gaussian target sigmas (pdl1 train --sigma-um)"
    )
    parser.add_argument("--lr-max", default="1e-3,3e-3", help="candidate peak learning rates")
    parser.add_argument("--cycles", default="3", help="candidate training cycles (members: one fewer)")
    parser.add_argument(
        "--init", type=Path, help="the nuclei model every candidate is fine-tuned from (default: the shipped one)"
    )
    parser.add_argument("--points", default="all,100,50,25", help="training point counts of the final models")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the final models (the selection uses the first)")
    parser.add_argument("--cache", type=Path, help="JSON file keeping the selection's scores per candidate")
    parser.add_argument("--select-only", action="store_true", help="stop after the selection: the test half unseen")
    parser.add_argument(
        "--select-by",
        choices=("strip", "cv2"),
        default="strip",
        help="strip: inner training part and validation strip; cv2: 2-fold cross-validation in the training half",
    )
    parser.add_argument("--select-seeds", help="seeds of the selection's models, pooled (default: the first seed)")
    parser.add_argument("--tta", default="off", help="test-time augmentation candidates: off, on or off,on")
    parser.add_argument("--pool", default="off", help="seeds pooled into one ensemble as candidates: off, on or off,on")
    parser.add_argument("--models", type=Path, help="folder keeping every model trained, reused by later runs")
    parser.add_argument(
        "--bootstrap", type=int, default=0, help="paired block-bootstrap draws of the test half (0: none)"
    )
    parser.add_argument("--block-px", default="125,250", help="the bootstrap's square sides, level-0 px")
    args = parser.parse_args()
    counts = [None if c == "all" else int(c) for c in args.points.split(",")]
    seeds = _csv(args.seeds, int)
    select_seeds = _csv(args.select_seeds, int) if args.select_seeds else seeds[:1]
    ttas = [{"off": False, "on": True}[t] for t in args.tta.split(",")]
    pools = [{"off": False, "on": True}[t] for t in args.pool.split(",")]
    settings = [
        Setting(*s)
        for s in itertools.product(
            _csv(args.iterations, int),
            _csv(args.stain_jitter, str),
            _csv(args.sigma_um, float),
            _csv(args.lr_max, float),
            _csv(args.cycles, int),
            [None if args.init is None else str(args.init.resolve())],
        )
    ]
    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}

    objects = list(read_features(POINTS))
    with open_slide(SLIDE) as slide:
        width, height = slide.dimensions
        mpp = slide.mpp.mean
        rgb = slide.read_region((0, 0), 0, (width, height))
    size = (width, height)
    all_xy = np.array([[o.geometry.x, o.geometry.y] for o in objects])
    rules = RULES
    train_box = (0, 0, SPLIT_X_PX, height)
    inner_box = (0, 0, SPLIT_X_PX, INNER_SPLIT_Y_PX)
    val_box = (0, INNER_SPLIT_Y_PX, SPLIT_X_PX, height)
    test_box = (SPLIT_X_PX, 0, width, height)
    radius_px = RADIUS_UM / mpp
    if args.select_by == "strip":
        folds = [(inner_box, val_box)]
        how = (
            f"inner training part x < {SPLIT_X_PX}, y < {INNER_SPLIT_Y_PX} px, "
            f"inner validation strip x < {SPLIT_X_PX}, y >= {INNER_SPLIT_Y_PX} px"
        )
    else:
        top, bottom = (0, 0, SPLIT_X_PX, CV_SPLIT_Y_PX), (0, CV_SPLIT_Y_PX, SPLIT_X_PX, height)
        folds = [(top, bottom), (bottom, top)]
        how = f"2-fold cross-validation in the training half, folds y < {CV_SPLIT_Y_PX} px and y >= {CV_SPLIT_Y_PX} px"
    n_fold = [(int(_in_box(all_xy, a).sum()), int(_in_box(all_xy, b).sum())) for a, b in folds]
    n_train = "+".join(str(a) for a, _ in n_fold)
    print(
        f"hgsc_stroma.svs: {width} x {height} px at {mpp} µm/px; detection F1 within {RADIUS_UM} µm.\n"
        f"Selection: {how} (training / validation points {n_fold}), seeds {select_seeds}",
        flush=True,
    )
    print("| detector | training points | precision | recall | F1 | peak threshold | time s |")
    print("|---|---|---|---|---|---|---|", flush=True)

    t0 = time.perf_counter()
    log_scores, log_params = DetectionScores(0, 0, 0), []
    for train_part, val_part in folds:
        params = tune_log(rgb, all_xy, mpp=mpp, box=train_part)
        got = _score(
            run_log(rgb, mpp=mpp, box=val_part, params=params), all_xy[_in_box(all_xy, val_part)], radius_px=radius_px
        )
        log_scores += got
        log_params.append(str(params))
    s = log_scores
    print(
        f"| LoG, tuned on {'the inner training part' if len(folds) == 1 else 'each fold'} {' / '.join(log_params)} "
        f"| {n_train} | {s.precision:.3f} "
        f"| {s.recall:.3f} | {s.f1:.3f} | - | {time.perf_counter() - t0:.0f} |",
        flush=True,
    )

    fold_labels = [
        (_labels(objects, a, rules=rules, size=size), _labels(objects, b, rules=rules, size=size)) for a, b in folds
    ]
    # Per (setting, tta, pool): the threshold fitted in the selection; the winner: the best pooled F1 there.
    fitted: dict[tuple[Setting, bool, bool], float] = {}
    chosen: tuple[float, Setting, bool, bool, float] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or Path(tmp)
        for setting, tta, pool in itertools.product(settings, ttas, pools):
            key = setting.key() | {"seed": select_seeds[0], "inner_split_y_px": INNER_SPLIT_Y_PX}
            if args.select_by != "strip" or len(select_seeds) > 1 or tta or pool:  # the earlier runs' keys stay valid
                key |= {"select_by": args.select_by, "seeds": select_seeds, "tta": tta}
            if pool:
                key |= {"pool": True}
            key = json.dumps(key)
            if key not in cache:
                found, seconds = [], []
                for i, (train_labels, val_labels) in enumerate(fold_labels):
                    fold_models, fold_seconds = [], []
                    for seed in select_seeds:
                        out = models / f"select_{args.select_by}{i}_seed{seed}_{_slug(setting)}"
                        if args.select_by == "strip" and not args.models:
                            out = Path(tmp) / f"inner_{len(cache)}_{seed}"
                        model, took = _trained(setting, train_labels, out=out, seed=seed)
                        fold_models.append(model)
                        fold_seconds.append(took)
                    if pool:  # one ensemble of the fold's seeds; its training time is theirs together
                        seeds_slug = "+".join(map(str, select_seeds))
                        out = models / f"select_{args.select_by}{i}_pooled{seeds_slug}_{_slug(setting)}"
                        fold_models, fold_seconds = [pool_members(fold_models, out=out)], [sum(fold_seconds)]
                    seconds += fold_seconds
                    config = NucleiConfig(tta=tta)
                    for model in fold_models:
                        found += labelled_nuclei(model, [val_labels], radius_um=RADIUS_UM, config=config, floor=0.1)
                fit = fit_min_score(found, current=DEFAULT_MIN_SCORE)
                rows = {}
                for t in sorted({DEFAULT_MIN_SCORE, fit.after}):
                    pooled = sum(map(_scores, score_labelled_nuclei(found, min_score=t)), DetectionScores(0, 0, 0))
                    rows[f"{t:g}"] = asdict(pooled)
                cache[key] = {"min_score": fit.after, "scores": rows, "seconds": float(np.mean(seconds))}
                if args.cache:
                    args.cache.write_text(json.dumps(cache, indent=1))
            got = cache[key]
            what = f"{setting}{', TTA' if tta else ''}{_pooled_words(select_seeds) if pool else ''}"
            for t, scores in sorted(got["scores"].items()):
                s = DetectionScores(**scores)
                how = "fitted here" if t == f"{got['min_score']:g}" else "model's"
                print(
                    f"| fine-tuned, {what} | {n_train} | {s.precision:.3f} "
                    f"| {s.recall:.3f} | {s.f1:.3f} | {float(t):g} ({how}) | {got['seconds']:.0f} |",
                    flush=True,
                )
            f1 = DetectionScores(**got["scores"][f"{got['min_score']:g}"]).f1
            fitted[setting, tta, pool] = got["min_score"]
            if chosen is None or f1 > chosen[0]:
                chosen = (f1, setting, tta, pool, got["min_score"])
    f1, setting, chosen_tta, chosen_pool, min_score = chosen
    print(
        f"chosen on the training half: {setting}{', TTA' if chosen_tta else ''}"
        f"{_pooled_words(select_seeds) if chosen_pool else ''}, peak threshold {min_score:g} (F1 {f1:.3f})",
        flush=True,
    )
    if args.select_only:
        return

    test_truth = all_xy[_in_box(all_xy, test_box)]
    print(f"\nTest half x >= {SPLIT_X_PX} px: {len(test_truth)} points, each model scored once")
    print("| detector | training points | seed | precision | recall | F1 | time s |")
    print("|---|---|---|---|---|---|---|", flush=True)

    def row(what: str, n_points: int, seed: str, s: DetectionScores, seconds: float) -> None:
        print(
            f"| {what} | {n_points} | {seed} | {s.precision:.3f} | {s.recall:.3f} | {s.f1:.3f} | {seconds:.0f} |",
            flush=True,
        )

    t0 = time.perf_counter()
    params = tune_log(rgb, all_xy, mpp=mpp, box=train_box)
    log_xy = run_log(rgb, mpp=mpp, box=test_box, params=params)
    s = _score(log_xy, test_truth, radius_px=radius_px)
    row(
        f"LoG on haematoxylin, tuned on the training half {params}",
        int(_in_box(all_xy, train_box).sum()),
        "-",
        s,
        time.perf_counter() - t0,
    )

    # The test half as a validation slide is: one region with every nucleus marked.
    test_labels = _labels(objects, test_box, rules=rules, size=size)

    # Per (points, seed or pooled seeds): the test-half detections at the chosen TTA and the model's threshold
    # (each seed's alone, the pooled ensemble, as --pool has them), for --bootstrap.
    kept: dict[tuple[int | None, str], np.ndarray] = {}

    def evaluate(model_dir: Path, threshold: float, *, tta: bool = False, keep: tuple | None = None) -> DetectionScores:
        config = NucleiConfig(tta=tta)
        found = labelled_nuclei(model_dir, [test_labels], radius_um=RADIUS_UM, config=config, floor=min(threshold, 0.1))
        if keep is not None:
            kept[keep] = found[0].pred_xy[found[0].pred_score >= threshold]
        return _scores(score_labelled_nuclei(found, min_score=threshold)[0])

    t0 = time.perf_counter()
    shipped = demo_model_dir("nuclei")
    row(
        "shipped phantom-trained nuclei ensemble, as it is",
        0,
        "-",
        evaluate(shipped, NucleiConfig().min_score_for(read_manifest(shipped, task="nuclei"))),
        time.perf_counter() - t0,
    )

    def rows(model: Path, pool: bool, seed: str, *, n: int | None, box: tuple, n_points: int, seconds: float) -> None:
        # Chosen first, then the other TTA candidates, each at its own threshold from the selection.
        for tta in sorted(ttas, key=lambda t: t != chosen_tta):
            threshold = fitted[setting, tta, pool]
            what = f"fine-tuned, {setting}, peak threshold {threshold:g}, strip y < {box[3]} px"
            if len(ttas) > 1 or tta:
                what += f", TTA {'on' if tta else 'off'}"
            if len(pools) > 1 or pool:
                what += _pooled_words(seeds) if pool else ", one seed"
            if (tta, pool) == (chosen_tta, chosen_pool):
                what += " (chosen)"
            keep = (n, seed) if tta == chosen_tta else None
            row(what, n_points, seed, evaluate(model, threshold, tta=tta, keep=keep), seconds)

    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or Path(tmp)
        for n in counts:
            box = strip_with_points(all_xy, n, width_px=SPLIT_X_PX, height_px=height)
            labels = _labels(objects, box, rules=rules, size=size)
            trained = [
                _trained(setting, labels, out=models / f"n{n or 'all'}_seed{seed}_{_slug(setting)}", seed=seed)
                for seed in seeds
            ]
            if False in pools:
                for seed, (model, seconds) in zip(seeds, trained, strict=True):
                    rows(model, False, str(seed), n=n, box=box, n_points=len(labels.points_class), seconds=seconds)
            if True in pools:
                seeds_slug = "+".join(map(str, seeds))
                out = models / f"n{n or 'all'}_pooled{seeds_slug}_{_slug(setting)}"
                pooled = pool_members([model for model, _ in trained], out=out)
                seconds = sum(s for _, s in trained)
                rows(pooled, True, seeds_slug, n=n, box=box, n_points=len(labels.points_class), seconds=seconds)
    if args.bootstrap:
        print(
            f"\nPaired block bootstrap, test half, {args.bootstrap} draws: each model "
            f"({'TTA' if chosen_tta else 'no TTA'}) minus the LoG, F1"
        )
        print("| training points | seed | square px (squares) | F1 difference | 95 % interval | model leads |")
        print("|---|---|---|---|---|---|")
        for block_px in _csv(args.block_px, int):
            base = block_counts(log_xy, test_truth, box=test_box, block_px=block_px, radius_px=radius_px)
            for (n, seed), pred_xy in kept.items():
                ours = block_counts(pred_xy, test_truth, box=test_box, block_px=block_px, radius_px=radius_px)
                d, lo, hi, share = paired_block_bootstrap(ours, base, n_boot=args.bootstrap)
                print(
                    f"| {n or 'all'} | {seed} | {block_px} ({len(base)}) | {d:+.3f} | {lo:+.3f} to {hi:+.3f} "
                    f"| {share:.1%} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
