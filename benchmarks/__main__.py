"""``python -m benchmarks NAME [--quick]``; ``python -m benchmarks`` lists them."""

from __future__ import annotations

import argparse

from benchmarks import BENCHMARKS, run_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", nargs="?", help="benchmark to run")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    args = parser.parse_args()
    if not args.name:
        for key, cls in BENCHMARKS.items():
            print(f"{key:20s} {cls.__doc__.strip().splitlines()[0]}")
        return
    run_benchmark(args.name, quick=args.quick)


if __name__ == "__main__":
    main()
