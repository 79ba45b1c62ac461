"""Speed and memory benchmarks, asv-style: ``setup`` builds synthetic input, cases are timed.

Run with ``python -m benchmarks NAME`` (or ``pdl1 bench NAME``). Each benchmark prints a
table with its throughput and the ratio against a baseline measured in the same run, and
the conditions (device, tile size, batch size, MPP) the figures hold for.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table


@dataclass
class Case:
    """One timed variant: ``run()`` does the work once and returns the units processed
    (or a pair: units and secondary units, e.g. Mpx and nuclei)."""

    label: str
    run: Callable[[], float | tuple[float, float]]
    baseline: bool = False


@dataclass
class Result:
    label: str
    seconds: list[float]
    units: float
    baseline: bool
    secondary_units: float | None = None
    extra: dict[str, str] | None = None

    @property
    def best_s(self) -> float:
        return min(self.seconds)

    @property
    def rate(self) -> float:
        return self.units / self.best_s


class Benchmark:
    """Base class: subclasses set ``unit`` and implement ``setup`` and ``cases``."""

    unit = "Mpx/s"
    secondary_unit: str | None = None
    extra_columns: tuple[str, ...] = ()
    repeats = 3
    warmup = True  # long end-to-end cases skip it: their first run is representative

    def extra(self, label: str) -> dict[str, str]:
        """Per-case figures that are not rates (peak memory, latency), shown as extra columns."""
        return {}

    def setup(self, *, quick: bool) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def cases(self) -> list[Case]:  # pragma: no cover - overridden
        raise NotImplementedError

    def conditions(self) -> dict[str, str]:
        return {}

    def teardown(self) -> None:
        pass


def machine_description() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}"


def run_cases(bench: Benchmark) -> list[Result]:
    results = []
    for case in bench.cases():
        if bench.warmup:
            case.run()  # warm-up: caches, thread pools, lazy imports
        seconds, out = [], 0.0
        for _ in range(bench.repeats):
            t0 = time.perf_counter()
            out = case.run()
            seconds.append(time.perf_counter() - t0)
        units, secondary = out if isinstance(out, tuple) else (out, None)
        results.append(Result(case.label, seconds, units, case.baseline, secondary, bench.extra(case.label)))
    return results


def print_results(title: str, bench: Benchmark, results: list[Result], console: Console | None = None) -> None:
    console = console or Console()
    baseline = next((r for r in results if r.baseline), results[0])
    table = Table(title=title)
    table.add_column("case")
    table.add_column(bench.unit, justify="right")
    if bench.secondary_unit:
        table.add_column(bench.secondary_unit, justify="right")
    table.add_column("best s", justify="right")
    table.add_column("median s", justify="right")
    table.add_column(f"x {baseline.label}", justify="right")
    for col in bench.extra_columns:
        table.add_column(col, justify="right")
    for r in results:
        secondary = []
        if bench.secondary_unit:
            secondary = ["" if r.secondary_units is None else f"{r.secondary_units / r.best_s:.0f}"]
        table.add_row(
            r.label + (" (baseline)" if r.baseline else ""),
            f"{r.rate:.2f}",
            *secondary,
            f"{r.best_s:.3f}",
            f"{statistics.median(r.seconds):.3f}",
            f"{r.rate / baseline.rate:.2f}",
            *[(r.extra or {}).get(col, "") for col in bench.extra_columns],
        )
    console.print(table)
    conditions = {"machine": machine_description(), **bench.conditions()}
    console.print(", ".join(f"{k}: {v}" for k, v in conditions.items()))


def _registry() -> dict[str, type[Benchmark]]:
    from benchmarks.nuclei_inference import NucleiInference
    from benchmarks.seg_inference import SegInference
    from benchmarks.service_roi import ServiceRoi
    from benchmarks.tile_read import TileRead
    from benchmarks.write_nuclei import WriteNuclei

    return {
        "tile_read": TileRead,
        "seg_inference": SegInference,
        "nuclei_inference": NucleiInference,
        "write_nuclei": WriteNuclei,
        "service_roi": ServiceRoi,
    }


class _LazyRegistry(dict):
    def _load(self) -> None:
        if not super().__len__():
            self.update(_registry())

    def items(self):
        self._load()
        return super().items()

    def __getitem__(self, key):
        self._load()
        return super().__getitem__(key)

    def __contains__(self, key):
        self._load()
        return super().__contains__(key)


BENCHMARKS: dict[str, type[Benchmark]] = _LazyRegistry()


def run_benchmark(name: str, *, quick: bool = False) -> list[Result]:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(k for k, _ in BENCHMARKS.items())}")
    bench = BENCHMARKS[name]()
    bench.setup(quick=quick)
    try:
        results = run_cases(bench)
        print_results(name, bench, results)
    finally:
        bench.teardown()
    return results
