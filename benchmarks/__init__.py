"""Speed and memory benchmarks, asv-style: ``setup`` builds synthetic input, cases are timed.

Run with ``python -m benchmarks NAME`` (or ``pdl1 bench NAME``). Each benchmark prints a
table with its throughput and the ratio against a baseline measured in the same run, and
the conditions (device, tile size, batch size, MPP) the figures hold for.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.table import Table

T = TypeVar("T")


@dataclass
class Case:
    """One timed variant: ``run()`` does the work once and returns the units processed
    (or a pair: units and secondary units, e.g. Mpx and nuclei)."""

    label: str
    run: Callable[[], float | tuple[float, float]]
    baseline: bool = False
    warmup: bool = True  # False for long cases whose first run is representative


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
    # Time the cases in rounds (each repeat runs every case once, in turn) instead of one case's
    # repeats after another, so that a change in the machine's load falls on all cases alike.
    interleave = False

    def extra(self, label: str) -> dict[str, str]:
        """Per-case figures that are not rates (peak memory, latency), shown as extra columns."""
        return {}

    def rate(self, result: Result) -> float:
        """The case's throughput in ``unit``: units over the best time, unless a benchmark times inside its cases."""
        return result.rate

    def setup(self, *, quick: bool) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def cases(self) -> list[Case]:  # pragma: no cover - overridden
        raise NotImplementedError

    def conditions(self) -> dict[str, str]:
        return {}

    def teardown(self) -> None:
        pass


class PhantomSlideBenchmark(Benchmark):
    """A benchmark over a phantom SVS that ``setup`` writes to a temporary folder (removed in teardown)."""

    size_px = 0
    tmp: Path | None = None
    slide = None  # inference.slides.slide.Slide once opened
    tissue = None  # its inference.slides.tissue.TissueMask
    _openslide_only = None

    def open_phantom(self, size_px: int, *, seed: int, ihc: bool = False) -> None:
        """Write a ``size_px``² phantom with ``seed`` (its PD-L1 IHC section with ``ihc``), open it and find
        its tissue."""
        from inference.phantom.pyramid import write_ihc_phantom, write_phantom
        from inference.phantom.scene import PhantomSpec
        from inference.slides.slide import open_slide
        from inference.slides.tissue import tissue_mask_for_slide

        self.size_px = size_px
        self.tmp = Path(tempfile.mkdtemp(prefix="pdl1-bench-"))
        path = self.tmp / "bench.svs"
        (write_ihc_phantom if ihc else write_phantom)(path, PhantomSpec(size_px, size_px, seed=seed))
        self.slide = open_slide(path)
        self.tissue = tissue_mask_for_slide(self.slide)

    def openslide_only(self):
        """The same phantom with every pixel read through OpenSlide (no direct tile decoding)."""
        import openslide

        from inference.slides.openslide_reader import OpenSlideReader
        from inference.slides.slide import Slide

        if self._openslide_only is None:
            reader = OpenSlideReader(openslide.OpenSlide(self.slide.path))
            self._openslide_only = Slide(reader, mpp=self.slide.mpp, path=self.slide.path)
        return self._openslide_only

    def teardown(self) -> None:
        for slide in (self.slide, self._openslide_only):
            if slide is not None:
                slide.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def cycled(members: Sequence[T], m: int) -> list[T]:
    """``m`` members taken in turn from ``members`` (repeated if it has fewer): speed does not depend on weights."""
    return [members[i % len(members)] for i in range(m)]


def time_calls(owner: object, name: str, phase: str, totals: dict[str, float], *, when=None) -> None:
    """Replace ``owner.name`` by a wrapper adding its wall time to ``totals[phase]`` (from 0; ``when(args)``
    filters the calls counted), so a child process can split a whole run into phases."""
    inner = getattr(owner, name)
    totals.setdefault(phase, 0.0)

    def wrapper(*args, **kwargs):
        if when is not None and not when(args):
            return inner(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[phase] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def machine_description() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}"


def run_cases(bench: Benchmark) -> list[Result]:
    cases = bench.cases()
    if bench.interleave:
        return _run_interleaved(bench, cases)
    results = []
    for case in cases:
        if bench.warmup and case.warmup:
            case.run()  # warm-up: caches, thread pools, lazy imports
        seconds, out = [], 0.0
        for _ in range(bench.repeats):
            t0 = time.perf_counter()
            out = case.run()
            seconds.append(time.perf_counter() - t0)
        results.append(_finished(bench, case, seconds, out))
    return results


def _run_interleaved(bench: Benchmark, cases: list[Case]) -> list[Result]:
    for case in cases:
        if bench.warmup and case.warmup:
            case.run()
    seconds: list[list[float]] = [[] for _ in cases]
    outs: list[float | tuple[float, float]] = [0.0] * len(cases)
    for round_ in range(bench.repeats):
        for i, case in enumerate(cases):
            t0 = time.perf_counter()
            outs[i] = case.run()
            seconds[i].append(time.perf_counter() - t0)
        print(f"  round {round_ + 1} of {bench.repeats} done", file=sys.stderr)
    return [_finished(bench, case, s, out) for case, s, out in zip(cases, seconds, outs, strict=True)]


def _finished(bench: Benchmark, case: Case, seconds: list[float], out: float | tuple[float, float]) -> Result:
    units, secondary = out if isinstance(out, tuple) else (out, None)
    result = Result(case.label, seconds, units, case.baseline, secondary, bench.extra(case.label))
    # A line per case as it finishes, so a long run that is cut short still shows what it measured.
    print(f"  {case.label}: {bench.rate(result):.2f} {bench.unit}, best {result.best_s:.3f} s", file=sys.stderr)
    return result


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
            f"{bench.rate(r):.2f}",
            *secondary,
            f"{r.best_s:.3f}",
            f"{statistics.median(r.seconds):.3f}",
            f"{bench.rate(r) / bench.rate(baseline):.2f}",
            *[(r.extra or {}).get(col, "") for col in bench.extra_columns],
        )
    console.print(table)
    conditions = {"machine": machine_description(), **bench.conditions()}
    console.print(", ".join(f"{k}: {v}" for k, v in conditions.items()))


# name -> "module:Class"; a benchmark is imported only when it runs, so one whose optional
# dependency (uvicorn, nnunetv2) is missing does not stop the others.
_REGISTRY: dict[str, str] = {
    "tile_read": "benchmarks.tile_read:TileRead",
    "jpeg_decode": "benchmarks.jpeg_decode:JpegDecode",
    "seg_inference": "benchmarks.seg_inference:SegInference",
    "nuclei_inference": "benchmarks.nuclei_inference:NucleiInference",
    "ihc_nuclei": "benchmarks.ihc_nuclei:IhcNuclei",
    "write_nuclei": "benchmarks.write_nuclei:WriteNuclei",
    "export_targets": "benchmarks.export_targets:ExportTargets",
    "train_labels": "benchmarks.train_labels:TrainLabels",
    "train_regions": "benchmarks.train_labels:TrainRegions",
    "service_roi": "benchmarks.service_roi:ServiceRoi",
    "result_pages": "benchmarks.result_pages:ResultPages",
    "service_loop": "benchmarks.service_loop:ServiceLoop",
    "seg_gpu": "benchmarks.seg_gpu:SegGpu",
    "peers": "benchmarks.peers:Peers",
    "engines": "benchmarks.engines:Engines",
    "runtimes": "benchmarks.runtimes:Runtimes",
    "run_profile": "benchmarks.run_profile:RunProfile",
    "allocator": "benchmarks.allocator:Allocator",
    "domain_guard": "benchmarks.domain_guard:DomainGuard",
    "cpu_contention": "benchmarks.cpu_contention:CpuContention",
}


# The extra of pyproject.toml that installs a benchmark's optional dependency, by its top-level module.
_EXTRAS = {
    "uvicorn": "serve",
    "fastapi": "serve",
    "httpx": "serve",
    "ray": "ray",
    "dynamic_network_architectures": "nnunet",
    "openvino": "openvino",
}


class BenchmarkUnavailableError(ImportError, RuntimeError):
    """A benchmark whose module cannot be imported here: an optional dependency is missing or broken."""


def benchmark_class(name: str) -> type[Benchmark]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as err:
        missing = (err.name or "").split(".")[0]
        if missing and missing in _EXTRAS:
            fix = f"pip install 'pdl1-bridge[{_EXTRAS[missing]}]'"
        elif missing and missing not in ("benchmarks", "inference", "bridge"):
            fix = f"install {missing} (pip install {missing})"
        else:
            fix = "reinstall pdl1-bridge (pip install -e .)"
        raise BenchmarkUnavailableError(
            f"benchmark {name!r} cannot be imported here ({type(err).__name__}: {err}); {fix}", name=err.name
        ) from err


def list_benchmarks() -> list[tuple[str, str]]:
    """(name, its docstring's first paragraph on one line) of every benchmark, or why it cannot be imported here."""
    rows = []
    for name in _REGISTRY:
        try:
            # The whole first paragraph: a first line alone stopped some mid-sentence ("k cells/s and").
            summary = benchmark_class(name).__doc__.strip().split("\n\n", 1)[0]
            rows.append((name, " ".join(summary.split())))
        except BenchmarkUnavailableError as err:
            rows.append((name, f"({err})"))
    return rows


def run_benchmark(name: str, *, quick: bool = False) -> list[Result]:
    bench = benchmark_class(name)()
    try:
        bench.setup(quick=quick)
    except BaseException:
        # A setup stopped half-way (an extra missing, Ctrl-C): its temporary folder (a phantom slide, MBs) was left
        # in /tmp for good. Its teardown closes what it opened where it can; the folder goes either way.
        with contextlib.suppress(Exception):
            bench.teardown()
        tmp = getattr(bench, "tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        results = run_cases(bench)
        print_results(name, bench, results)
    finally:
        bench.teardown()
    return results
