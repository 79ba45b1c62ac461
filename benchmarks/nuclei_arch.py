"""The nuclei FCN's width and input resolution against held-out F1 (issue #35), one variant per row.

``python -m benchmarks.nuclei_arch --work DIR [--stage phantoms|train|eval|speed|table|all] [--variants ...]``

1. Writes the shipped nuclei model's 4 training phantoms (``t101``-``t104``) and the 7 held-out ones
   (``h201``-``h207``) under ``DIR/slides`` once, as ``pdl1 phantom`` does (README).
2. Trains each variant with the shipped model's recipe (``pdl1 train nuclei train/t10{1,2,3,4}.svs
   --cycles 3 --epochs-per-cycle 3 --iterations 40``), changing only what the variant names, into
   ``DIR/models/NAME`` (kept when its manifest exists). The list is fixed here, before any held-out result.
3. Scores the shipped model and every variant on the held-out slides as ``pdl1 eval nuclei`` does
   (:func:`inference.evaluate_nuclei`, F1 at 3 µm, TPS), and times ``detect_nuclei`` on one held-out
   slide for all of them interleaved (every round runs every model once, in turn), so that the load of
   other jobs falls on every row alike; ratios are against the shipped model in the same run.
4. Prints a table and writes ``DIR/nuclei_arch.json`` (with ``DIR/train/*.json``, ``DIR/eval/*.json`` and
   ``DIR/speed.json``, which each ``--stage speed`` run replaces).

Not a registry benchmark: it trains models. Set ``OMP_NUM_THREADS`` before it starts (``speed.json`` records
torch's thread count). The variants' training times are not comparable when other work shares the CPUs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# (name, seed, TPS %, shift) as in the README's commands.
TRAINING = (("t101", 101, 25.0, 0.0), ("t102", 102, 50.0, 0.3), ("t103", 103, 70.0, 0.0), ("t104", 104, 40.0, 0.3))
HELD_OUT = (
    ("h201", 201, 35.0, 0.0),
    ("h202", 202, 60.0, 0.4),
    ("h203", 203, 20.0, 0.0),
    ("h204", 204, 55.0, 0.2),
    ("h205", 205, 45.0, 0.3),
    ("h206", 206, 0.5, 0.0),
    ("h207", 207, 40.0, 0.7),
)
SIZE_PX = 4096
SPEED_SLIDE = "h201"
SHIPPED = "shipped"


@dataclass(frozen=True)
class Variant:
    """One training run: the shipped recipe with these fields changed."""

    name: str
    width: int = 32
    input_mpp: float = 1.0
    seed: int = 0
    note: str = ""


# Fixed before any held-out result was looked at.
VARIANTS = (
    Variant("w32-seed1", seed=1, note="the recipe re-run with seed 1: run-to-run spread"),
    Variant("w32-seed2", seed=2, note="the recipe re-run with seed 2: run-to-run spread"),
    Variant("w16", width=16, note="half the width"),
    Variant("w24", width=24, note="three quarters of the width"),
    Variant("w32-1.5um", input_mpp=1.5, note="input at 1.5 µm/px (2.25x fewer px per nucleus)"),
)
# Added after the results above were seen: a second seed of each narrower width, whatever it shows.
FOLLOW_UP = (
    Variant("w24-seed1", width=24, seed=1, note="w24's own run-to-run spread"),
    Variant("w16-seed1", width=16, seed=1, note="w16's own run-to-run spread"),
)


@dataclass(frozen=True)
class SpeedRow:
    """One model's speed against the baseline timed in the same rounds."""

    name: str
    best_s: float
    median_s: float
    ms_per_tissue_mpx: float
    x_baseline: float  # baseline's best time / this row's best time: > 1 is faster


def speed_rows(seconds: dict[str, list[float]], *, tissue_mpx: float, baseline: str) -> list[SpeedRow]:
    """Best and median seconds per model, ms per tissue Mpx (of the best) and speed-up against ``baseline``.

    >>> [r.x_baseline for r in speed_rows({"a": [2.0, 3.0], "b": [1.0, 1.5]}, tissue_mpx=4.0, baseline="a")]
    [1.0, 2.0]
    """
    if baseline not in seconds:
        raise ValueError(f"baseline {baseline!r} is not among the timed models {sorted(seconds)}")
    if tissue_mpx <= 0:
        raise ValueError(f"tissue_mpx must be > 0, got {tissue_mpx}")
    base = min(seconds[baseline])
    return [
        SpeedRow(name, min(s), statistics.median(s), 1000 * min(s) / tissue_mpx, base / min(s))
        for name, s in seconds.items()
    ]


def slide_path(work: Path, name: str) -> Path:
    return work / "slides" / f"{name}.svs"


def write_phantoms(work: Path) -> None:
    from inference.phantom.pyramid import write_phantom
    from inference.phantom.scene import PhantomSpec

    for name, seed, tps, shift in TRAINING + HELD_OUT:
        path = slide_path(work, name)
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_phantom(path, PhantomSpec(SIZE_PX, SIZE_PX, seed=seed, tps_percent=tps, shift=shift))
        print(f"{path}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def model_dir(work: Path, name: str) -> Path:
    if name == SHIPPED:
        from inference.models.ensemble import demo_model_dir

        return Path(demo_model_dir("nuclei"))
    return work / "models" / name


def train(work: Path, variant: Variant) -> None:
    import torch

    from inference.training.train_nuclei import NucleiTrainConfig, train_nuclei

    out = model_dir(work, variant.name)
    record = work / "train" / f"{variant.name}.json"
    if (out / "manifest.json").is_file() and record.is_file():
        return
    # A variant stopped before its record was written is trained again from the start (its time is a figure here);
    # training refuses a folder holding an interrupted run's checkpoint.
    if out.is_relative_to(work):  # never the shipped model's folder
        shutil.rmtree(out, ignore_errors=True)
    config = NucleiTrainConfig(
        slides=tuple(str(slide_path(work, name)) for name, *_ in TRAINING),
        out_dir=str(out),
        width=variant.width,
        input_mpp=variant.input_mpp,
        cycles=3,
        epochs_per_cycle=3,
        iterations_per_epoch=40,
        seed=variant.seed,
    )
    t0 = time.perf_counter()
    last = [t0]

    def on_progress(done: int, total: int) -> None:
        if done % config.iterations_per_epoch:
            return
        now = time.perf_counter()
        print(f"  {variant.name}: {done}/{total} ({now - last[0]:.1f} s)", file=sys.stderr, flush=True)
        last[0] = now

    train_nuclei(config, on_progress=on_progress)
    seconds = time.perf_counter() - t0
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(
        json.dumps({"variant": asdict(variant), "train_s": seconds, "torch_threads": torch.get_num_threads()}, indent=1)
    )
    print(f"{variant.name}: trained in {seconds:.0f} s", file=sys.stderr)


def evaluate(work: Path, name: str) -> dict:
    from inference import evaluate_nuclei
    from inference.models.ensemble import Ensemble

    ensemble = Ensemble.load(model_dir(work, name), task="nuclei", device="cpu")
    rows = {}
    for slide, *_ in HELD_OUT:
        ev = evaluate_nuclei(slide_path(work, slide), ensemble, radius_um=3.0)
        rows[slide] = {
            "f1": ev.overall.f1,
            "precision": ev.overall.precision,
            "recall": ev.overall.recall,
            "class_f1": dict(zip(ev.class_names, (c.f1 for c in ev.per_class), strict=True)),
            "tps_category_pred": ev.tps_pred.category,
            "tps_category_truth": ev.tps_truth.category,
            "tps_pred": ev.tps_pred.percent,
            "tps_truth": ev.tps_truth.percent,
            "tps_abs_error": ev.tps_abs_error,
        }
        print(f"  {name} {slide}: F1 {ev.overall.f1:.4f}, TPS error {ev.tps_abs_error}", file=sys.stderr)
    out = work / "eval" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return rows


def measure_speed(work: Path, names: list[str], *, rounds: int) -> dict:
    """``detect_nuclei`` on the speed slide's tissue, every model once per round (after a warm-up round)."""
    import copy

    import torch

    from benchmarks.peers import conv_flops_per_tile
    from inference.analysis.nuclei import NucleiConfig, detect_nuclei
    from inference.models.ensemble import Ensemble, Precision
    from inference.slides.slide import open_slide
    from inference.slides.tissue import tissue_mask_for_slide

    config = NucleiConfig()
    ensembles = {n: Ensemble.load(model_dir(work, n), task="nuclei", device="cpu") for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    counts: dict[str, int] = {}
    with open_slide(slide_path(work, SPEED_SLIDE)) as slide:
        tissue = tissue_mask_for_slide(slide)
        tissue_mpx = float(tissue.mask.sum()) * tissue.downsample**2 / 1e6
        level0_mpp = slide.mpp.mean
        for n in names:  # warm-up
            counts[n] = len(detect_nuclei(slide, ensembles[n], tissue=tissue, config=config))
        for r in range(rounds):
            for n in names:
                t0 = time.perf_counter()
                detect_nuclei(slide, ensembles[n], tissue=tissue, config=config)
                seconds[n].append(time.perf_counter() - t0)
            print(
                f"  round {r + 1} of {rounds}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names),
                file=sys.stderr,
            )
    rows = speed_rows(seconds, tissue_mpx=tissue_mpx, baseline=names[0])
    result = {
        "slide": SPEED_SLIDE,
        "tissue_mpx": tissue_mpx,
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
    }
    result["precision"] = str(Precision.choose(config.precision, torch.device("cpu")).autocast_dtype or "fp32")
    result["batch"] = config.batch_for(torch.device("cpu"))
    result["models"] = {}
    for row in rows:
        m = ensembles[row.name].manifest
        tile = m.tile_size_px
        flops = conv_flops_per_tile(copy.deepcopy(ensembles[row.name].members[0]).cpu(), tile)
        tile_level0_mpx = (tile * m.input_mpp / level0_mpp) ** 2 / 1e6
        result["models"][row.name] = {
            **asdict(row),
            "seconds": seconds[row.name],
            "nuclei": counts[row.name],
            "width": m.architecture_kwargs["width"],
            "input_mpp": m.input_mpp,
            "members": len(m.members),
            "gflop_per_tile": flops / 1e9,
            "gflop_per_level0_mpx": len(m.members) * flops / 1e9 / tile_level0_mpx,
        }
    out = work / "speed.json"
    out.write_text(json.dumps(result, indent=1))
    return result


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def table(work: Path, names: list[str]) -> str:
    """Two markdown tables of what ``work`` holds: F1 per held-out slide, and the summary per model."""
    speed = json.loads((work / "speed.json").read_text()) if (work / "speed.json").is_file() else {"models": {}}
    slides = [s for s, *_ in HELD_OUT]
    per_slide = ["| model | " + " | ".join(slides) + " | mean |", "|" + "---|" * (len(slides) + 2)]
    summary = [
        "| model | width | µm/px | train s | mean F1 | ΔF1 vs shipped | class F1 (macro) | TPS MAE | worst TPS error "
        "| TPS categories right | GFLOP / 256² tile, one member | GFLOP / level-0 Mpx, all members "
        "| ms / tissue Mpx | x shipped |",
        "|" + "---|" * 14,
    ]
    ref = None
    for n in names:
        ev_file, tr_file = work / "eval" / f"{n}.json", work / "train" / f"{n}.json"
        ev = json.loads(ev_file.read_text()) if ev_file.is_file() else {}
        tr = json.loads(tr_file.read_text()) if tr_file.is_file() else {}
        sp = speed["models"].get(n, {})
        f1s = [ev[s]["f1"] for s in slides if s in ev]
        mean_f1 = _mean(f1s) if len(f1s) == len(slides) else None
        ref = mean_f1 if n == SHIPPED else ref
        errors = [ev[s]["tps_abs_error"] for s in slides if s in ev and ev[s]["tps_abs_error"] is not None]
        macro = [statistics.fmean(ev[s]["class_f1"].values()) for s in slides if "class_f1" in ev.get(s, {})]
        right = sum(ev[s]["tps_category_pred"] == ev[s]["tps_category_truth"] for s in slides if s in ev)
        per_slide.append(f"| {n} | " + " | ".join(_cell(ev.get(s, {}).get("f1"), ".4f") for s in slides))
        per_slide[-1] += f" | {_cell(mean_f1, '.4f')} |"
        cells = [
            n,
            str(sp.get("width", tr.get("variant", {}).get("width", ""))),
            _cell(sp.get("input_mpp", tr.get("variant", {}).get("input_mpp")), "g"),
            _cell(tr.get("train_s"), ".0f"),
            _cell(mean_f1, ".4f"),
            _cell(None if mean_f1 is None or ref is None else mean_f1 - ref, "+.4f"),
            _cell(_mean(macro) if len(macro) == len(slides) else None, ".4f"),
            _cell(_mean(errors), ".2f"),
            _cell(max(errors) if errors else None, ".1f"),
            f"{right}/{len(slides)}" if ev else "",
            _cell(sp.get("gflop_per_tile"), ".2f"),
            _cell(sp.get("gflop_per_level0_mpx"), ".2f"),
            _cell(sp.get("ms_per_tissue_mpx"), ".0f"),
            _cell(sp.get("x_baseline"), ".2f"),
        ]
        summary.append("| " + " | ".join(cells) + " |")
    return "\n".join(per_slide) + "\n\n" + "\n".join(summary)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nuclei_arch", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--stage", choices=("phantoms", "train", "eval", "speed", "table", "all"), default="all")
    parser.add_argument("--variants", nargs="*", help="names to train/evaluate (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = [v for v in VARIANTS + FOLLOW_UP if not args.variants or v.name in args.variants]
    names = [SHIPPED] + [v.name for v in VARIANTS + FOLLOW_UP]
    eval_names = ([SHIPPED] if not args.variants or SHIPPED in args.variants else []) + [v.name for v in variants]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("phantoms", "all"):
        write_phantoms(work)
    if args.stage in ("train", "all"):
        for v in variants:
            train(work, v)
    if args.stage in ("eval", "all"):
        for n in eval_names:
            evaluate(work, n)
    if args.stage in ("speed", "all"):
        trained = [n for n in names if (model_dir(work, n) / "manifest.json").is_file()]
        measure_speed(work, trained, rounds=args.rounds)
    text = table(work, names)
    print(text)
    (work / "nuclei_arch.json").write_text(
        json.dumps(
            {
                "variants": [asdict(v) for v in VARIANTS],
                "follow_up": [asdict(v) for v in FOLLOW_UP],
                "train": {n: json.loads(p.read_text()) for n in names if (p := work / "train" / f"{n}.json").is_file()},
                "eval": {n: json.loads(p.read_text()) for n in names if (p := work / "eval" / f"{n}.json").is_file()},
                "speed": json.loads((work / "speed.json").read_text()) if (work / "speed.json").is_file() else None,
                "table": text,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
