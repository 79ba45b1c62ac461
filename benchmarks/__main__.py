"""``python -m benchmarks NAME [--quick]``; ``python -m benchmarks`` lists them."""

from __future__ import annotations

import argparse

from benchmarks import list_benchmarks, run_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", nargs="?", help="benchmark to run")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    args = parser.parse_args()
    if not args.name:
        for key, doc in list_benchmarks():
            print(f"{key:20s} {doc}")
        return
    try:
        run_benchmark(args.name, quick=args.quick)
    except (KeyError, RuntimeError) as err:  # unknown name, or a benchmark this machine cannot run
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
