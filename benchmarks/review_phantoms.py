"""The phantom sets the review rule is calibrated and checked on (issue #32), written reproducibly.

``python -m benchmarks.review_phantoms OUT --seeds 1600-1629``: one 2048² H&E phantom per seed,
``OUT/c<seed>.svs`` with its truth, each seed drawing its own TPS (log-uniform over 0.5-90 %), stain shift
(uniform over 0-1) and weak-expression fraction (uniform over 0-0.4) from ``numpy.random.default_rng(seed)``,
the same files as ``pdl1 phantom OUT/c<seed>.svs --size 2048 --seed <seed> --tps .. --shift .. --weak-fraction ..``.
``--tps 0`` gives every seed that TPS instead (a set of truly negative cases, which a lab sees often and the
log-uniform draw never gives; shift and weak fraction are drawn as before).
Existing files are kept. ``--ihc`` also writes each case's PD-L1 IHC section, ``OUT/ihc_<seed>.svs``, as
``pdl1 phantom ... --ihc OUT/ihc_<seed>.svs`` does (for ``pdl1 eval ihc``, whose review flag it checks).
Then ``pdl1 calibrate OUT/c16*.svs --out MODEL`` and ``pdl1 eval suite OUT/c17*.svs --model MODEL`` (README,
``pdl1 calibrate``). Not a registry benchmark: it writes files.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

TPS_RANGE = (0.5, 90.0)
SHIFT_RANGE = (0.0, 1.0)
WEAK_RANGE = (0.0, 0.4)


def draw(seed: int, tps_percent: float | None = None) -> tuple[float, float, float]:
    """(TPS %, shift, weak fraction) of a seed, rounded as written; ``tps_percent`` replaces the drawn TPS
    (the other two stay those of the seed).

    >>> draw(1600)
    (2.83, 1.0, 0.11)
    >>> draw(1600, tps_percent=0)
    (0, 1.0, 0.11)
    """
    rng = np.random.default_rng(seed)
    tps = math.exp(rng.uniform(math.log(TPS_RANGE[0]), math.log(TPS_RANGE[1])))
    if tps_percent is not None:
        tps = tps_percent
    return round(tps, 2), round(rng.uniform(*SHIFT_RANGE), 2), round(rng.uniform(*WEAK_RANGE), 2)


def _seeds(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main() -> None:
    from inference.phantom.ihc import IhcSpec
    from inference.phantom.pyramid import write_ihc_phantom, write_phantom
    from inference.phantom.scene import PhantomSpec

    parser = argparse.ArgumentParser(prog="python -m benchmarks.review_phantoms", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=_seeds, required=True, help="FIRST-LAST, e.g. 1600-1629")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--ihc", action="store_true", help="also write each case's PD-L1 IHC section")
    parser.add_argument("--tps", type=float, help="this TPS %% for every seed instead of its draw (0: negative cases)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        tps, shift, weak = draw(seed, args.tps)
        path = args.out / f"c{seed}.svs"
        spec = PhantomSpec(args.size, args.size, seed=seed, tps_percent=tps, shift=shift, weak_fraction=weak)
        if not path.is_file():
            write_phantom(path, spec)
        print(f"{path}: TPS {tps} %, shift {shift}, weak fraction {weak}")
        ihc = args.out / f"ihc_{seed}.svs"
        if args.ihc and not ihc.is_file():
            write_ihc_phantom(ihc, spec, IhcSpec(immune_positive_fraction=0.3), paired_with=path)
            print(f"{ihc}: its PD-L1 IHC section")


if __name__ == "__main__":
    main()
