"""The domain guard's out-of-domain score as a truth-free router between the demo and a fine-tuned model (issue #33).

``python -m benchmarks.guard_router --work DIR [--sets val|held|all] [--threshold limit|X] [--guard-only]
[--models NAME,...] [--shift 0.5 --weak-fraction 0.5]``

``DIR`` is a work folder of :mod:`benchmarks.shift_finetune` (its phantoms and fine-tuned model folders, kept).
For each validation and held-out slide the demo segmentation ensemble's domain-guard figures are computed as
``pdl1 run`` computes them (:func:`inference.pipeline.analyse_slide`, its ``summary["domain"]``): the
out-of-domain score and stain distance with their limits from the demo manifest. The router sends a slide to the
fine-tuned model where the score is over the threshold (``limit``: the manifest's own limit, the guard's flag),
to the demo elsewhere; its Dice is each slide's Dice of the model it was sent to, against the demo's on the same
slides (``known`` in :mod:`benchmarks.shift_finetune` is the same with the slide's domain taken from where it
came, but with the shipped demo itself elsewhere, not the fine-tune's weights with the demo's statistics).
The domain (truth) is printed for reporting only; the router never reads it.

Measured (2026-12-05, work folder of shift_finetune ``--shift 0.5 --weak-fraction 0.5 --extremes``): the guard's
limit flagged no slide of either domain; ``--threshold 1.467`` (midway between the validation slides' highest
unshifted score and lowest domain score, fixed before the held-out slides were looked at) sent 3 of 4 held-out
domain slides and no unshifted one to the fine-tune. See the README's section on BatchNorm statistics.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.shift_finetune import mean_dice
from inference.models.ensemble import demo_model_dir
from inference.pipeline import Models, PipelineConfig, analyse_slide

# set: (name, of the domain?), the slides of benchmarks.shift_finetune's phantoms.
SLIDES = {
    "val": [("val_881", True), ("val_882", True), ("val_891", False), ("val_892", False)],
    "held": [
        *((f"held_{s}", True) for s in (851, 852, 853, 854)),
        *((f"held_{s}", False) for s in (861, 862, 863, 864)),
    ],
    "extreme": [("held_855", True), ("held_856", True), ("held_865", False), ("held_866", False)],
}
MODELS = (
    "model_3lab+3unl0_seed{seed}_adamw_0.001_pf0.5_r3x200{tag}_anchor10_pw1",
    "model_3lab_seed{seed}_adamw_0.001_pf0.5_r3x200{tag}_anchor10",
)


def route(scores: Sequence[float | None], threshold: float | Sequence[float | None]) -> list[bool]:
    """Per slide, whether it goes to the fine-tuned model: its out-of-domain score over ``threshold`` (one
    value, or one per slide: the guard's own limit). A slide the guard did not measure (None) stays with the demo."""
    limits = [threshold] * len(scores) if not isinstance(threshold, Sequence) else list(threshold)
    if len(limits) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(limits)} thresholds")
    return [s is not None and t is not None and s > t for s, t in zip(scores, limits, strict=True)]


def routed_dice(fine_tuned: Sequence[float], demo: Sequence[float], to_fine_tuned: Sequence[bool]) -> list[float]:
    """Each slide's Dice of the model it was routed to."""
    return [f if r else d for f, d, r in zip(fine_tuned, demo, to_fine_tuned, strict=True)]


def guard_figures(path: Path, models: Models, config: PipelineConfig) -> dict:
    """The demo's domain-guard figures for one slide, as ``pdl1 run`` reports them."""
    return analyse_slide(path, models=models, config=config).summary["domain"]


def slide_path(work: Path, name: str, domain: bool, tag: str) -> Path:
    return work / f"{name}{tag if domain else ''}.svs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a benchmarks.shift_finetune work folder")
    parser.add_argument("--sets", default="val", help="val, held, extreme or all (val,held,extreme), comma-separated")
    parser.add_argument("--shift", type=float, default=0.5)
    parser.add_argument("--weak-fraction", type=float, default=0.5)
    parser.add_argument(
        "--threshold", default="limit", help="route to the fine-tune where the score is over this (limit: the guard's)"
    )
    parser.add_argument("--guard-only", action="store_true", help="print the guard table only (no Dice)")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    tag = f"_s{args.shift:g}_w{args.weak_fraction:g}"
    sets = ["val", "held", "extreme"] if args.sets == "all" else args.sets.split(",")
    slides = [
        (key, name, domain, slide_path(args.work, name, domain, tag)) for key in sets for name, domain in SLIDES[key]
    ]
    slides = [s for s in slides if s[3].exists()]
    config = PipelineConfig(device="cpu", run_nuclei=False, run_sua=False)
    models = Models(config)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; guard of {models.seg.manifest.name}")
    print("| set | slide | domain (truth) | out-of-domain score | limit | stain distance ° | limit | flagged |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    guard = {}
    for key, _name, domain, path in slides:
        g = guard_figures(path, models, config)
        guard[path] = g
        score, limit = g["out_of_domain_score"], g["limit"]
        stain, stain_limit = g["stain_distance_deg"], g["stain_limit_deg"]
        flagged = (score is not None and score > limit) or (stain is not None and stain > stain_limit)
        print(
            f"| {key} | {path.stem} | {'domain' if domain else 'unshifted'} | {score:.3f} | {limit:.3f} | "
            f"{stain:.2f} | {stain_limit:.2f} | {'yes' if flagged else 'no'} |",
            flush=True,
        )
    if args.guard_only:
        return
    scores = [guard[p]["out_of_domain_score"] for *_, p in slides]
    thresholds = [guard[p]["limit"] for *_, p in slides] if args.threshold == "limit" else float(args.threshold)
    to_ft = route(scores, thresholds)
    flagged = route(scores, [guard[p]["limit"] for *_, p in slides])
    paths = [p for *_, p in slides]
    demo = mean_dice(demo_model_dir("seg"), paths)[1]
    routed = [p.stem for p, r in zip(paths, to_ft, strict=True) if r]
    print(f"\nrouted to the fine-tune (threshold {args.threshold}): {routed}")

    def means(dice: list[float]) -> str:
        out = []
        for key in sets:
            for want, label in ((True, "domain"), (False, "unshifted")):
                idx = [i for i, (k, _, d, _) in enumerate(slides) if k == key and d == want]
                if idx:
                    m = float(np.mean([dice[i] for i in idx]))
                    b = float(np.mean([demo[i] for i in idx]))
                    out.append(f"{key} {label} {m:.4f} ({m - b:+.4f})")
        return "; ".join(out)

    print(f"\nshipped demo: {means(demo)}")
    print("per slide demo:", {p.stem: round(d, 4) for p, d in zip(paths, demo, strict=True)}, flush=True)
    for seed in args.seeds.split(","):
        for pattern in MODELS:
            model_dir = args.work / pattern.format(seed=seed, tag=tag)
            if not (model_dir / "manifest.json").exists():
                print(f"{model_dir.name}: not there")
                continue
            own = mean_dice(model_dir, paths)[1]
            print(f"\n{model_dir.name}")
            print("per slide:", {p.stem: round(d, 4) for p, d in zip(paths, own, strict=True)})
            print(f"  own everywhere:   {means(own)}")
            print(f"  guard-routed:     {means(routed_dice(own, demo, to_ft))}")
            print(f"  guard's limit:    {means(routed_dice(own, demo, flagged))}")
            known = [d for *_, d, _ in slides]
            print(f"  known domain:     {means(routed_dice(own, demo, known))}", flush=True)


if __name__ == "__main__":
    main()
