"""``pdl1 run``'s analysis on eager PyTorch while other processes load the CPUs: OpenMP wait policies (issue #35).

PyTorch's CPU wheel runs its thread pool on GNU libgomp, whose threads spin at every barrier before they
sleep. When another process holds a core, a layer's barrier waits for the thread that was descheduled while
its peer spins. Each case is a child process (``python -m benchmarks.cpu_contention --child``) that makes
``pdl1``'s allocator settings, loads copies of the shipped demo models (segmentation M=5, H&E nuclei) and
runs ``analyse_slide`` as ``pdl1 run`` does on the phantom (seed 81), timing the analysis alone, under one
of these settings:

- torch default: the environment as it is, with ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` removed
  (libgomp spins 300 000 times before a thread sleeps; the baseline of each load level);
- pdl1's setting (``inference.openmp``, what every ``pdl1`` command sets at start-up): ``GOMP_SPINCOUNT=1000``,
  threads spin a little and then sleep;
- ``OMP_WAIT_POLICY=PASSIVE``: libgomp's threads sleep at once at a barrier;
- one thread: ``torch.set_num_threads(1)``, no barriers at all.

The variables are in the child's environment from its start, so libgomp reads them when torch loads it.
Each setting runs quiet and beside 1 and 2 busy-loop processes (``while True: pass``) that the benchmark
starts just before the child and kills when it ends, so every case of a load level sees the same load.
The child writes its analysis time, its CPU time in the analysis, the TPS and the nuclei count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import Case, PhantomSlideBenchmark
from inference.openmp import SPIN_COUNT, WAIT_POLICY_VARIABLES

#: setting -> (environment variables for the child, torch threads or None for torch's default)
SETTINGS: dict[str, tuple[dict[str, str], int | None]] = {
    "torch default": ({}, None),
    f"pdl1: GOMP_SPINCOUNT={SPIN_COUNT}": ({"GOMP_SPINCOUNT": str(SPIN_COUNT)}, None),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "1 thread": ({}, 1),
}
#: busy-loop processes beside the child
LOADS = (0, 1, 2)
_OMP_VARIABLES = WAIT_POLICY_VARIABLES


def _load_label(busy: int) -> str:
    return "quiet" if busy == 0 else f"{busy} busy"


def _child(slide: Path, models_dir: Path, out: Path, *, threads: int | None) -> None:
    import inference.allocator as allocator

    allocator.tune_allocator()
    import torch

    import inference.pipeline as pipeline
    from inference import Models, PipelineConfig

    if threads is not None:
        torch.set_num_threads(threads)
    config = PipelineConfig(
        device="cpu", seg_model_dir=str(models_dir / "seg"), nuclei_model_dir=str(models_dir / "nuclei")
    )
    models = Models(config)
    models.load_he()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = pipeline.analyse_slide(slide, models=models, config=config)
    t_analysis = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out.write_text(
        json.dumps(
            {
                "analysis_s": t_analysis,
                "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
                "tps": None if result.tps is None else result.tps.percent,
                "nuclei": len(result.nuclei.xy),
                "threads": torch.get_num_threads(),
                "omp": {name: os.environ.get(name) for name in _OMP_VARIABLES},
            }
        )
    )


class CpuContention(PhantomSlideBenchmark):
    """pdl1 run's analysis on eager PyTorch, quiet and beside 1 and 2 busy processes, per OpenMP wait setting."""

    unit = "Mpx/s"
    secondary_unit = "nuclei/s"
    repeats = 3
    interleave = True  # rounds: every case once per round, so drift in the machine falls on all alike
    warmup = False  # every run is a fresh process
    extra_columns = ("analysis s", "analysis median s", "x torch default (same load)", "CPU s", "TPS %", "nuclei")

    def setup(self, *, quick: bool) -> None:
        from inference.models.ensemble import demo_model_dir

        self.open_phantom(4096 if quick else 8192, seed=81)
        self.models_dir = self.tmp / "models"
        for kind in ("seg", "nuclei"):
            shutil.copytree(demo_model_dir(kind), self.models_dir / kind, ignore=shutil.ignore_patterns(".openvino"))
        self.runs: dict[str, list[dict]] = {}

    def _case(self, busy: int, setting: str) -> tuple[float, float]:
        variables, threads = SETTINGS[setting]
        label = f"{_load_label(busy)}: {setting}"
        env = {k: v for k, v in os.environ.items() if k not in _OMP_VARIABLES}
        env.update(variables)
        n = len(self.runs.setdefault(label, []))
        out = self.tmp / f"run_{busy}_{list(SETTINGS).index(setting)}_{n}.json"
        cmd = [sys.executable, "-m", "benchmarks.cpu_contention", "--child", str(self.slide.path),
               str(self.models_dir), str(out)] + ([] if threads is None else ["--threads", str(threads)])  # fmt: skip
        loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            subprocess.run(cmd, check=True, env=env)
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
        figures = json.loads(out.read_text())
        print(f"    {label} run {n + 1}: analysis {figures['analysis_s']:.2f} s, CPU {figures['cpu_s']:.2f} s, "
              f"nuclei {figures['nuclei']}, TPS {figures['tps']}", file=sys.stderr)  # fmt: skip
        self.runs[label].append(figures)
        return self.size_px**2 / 1e6, figures["nuclei"]

    def cases(self) -> list[Case]:
        return [
            Case(
                f"{_load_label(busy)}: {setting}",
                (lambda busy=busy, setting=setting: self._case(busy, setting)),
                baseline=busy == 0 and setting == "torch default",
                warmup=False,
            )
            for busy in LOADS
            for setting in SETTINGS
        ]

    def extra(self, label: str) -> dict[str, str]:
        runs = self.runs.get(label, [])
        if not runs:
            return {}
        base = self.runs.get(f"{label.split(': ')[0]}: torch default", [])
        best = min(r["analysis_s"] for r in runs)
        median = statistics.median(r["analysis_s"] for r in runs)
        # Medians, as the README's tables: beside busy loops one lucky round moves the best time a lot.
        ratio = f"{statistics.median(r['analysis_s'] for r in base) / median:.2f}" if base else ""
        return {
            "analysis s": f"{best:.2f}",
            "analysis median s": f"{median:.2f}",
            "x torch default (same load, medians)": ratio,
            "CPU s": f"{statistics.median(r['cpu_s'] for r in runs):.2f}",
            "TPS %": ", ".join(sorted({f"{r['tps']:.2f}" for r in runs if r["tps"] is not None})),
            "nuclei": ", ".join(sorted({str(r["nuclei"]) for r in runs})),
        }

    def conditions(self) -> dict[str, str]:
        import torch

        return {
            "device": "cpu",
            "slide": f"phantom {self.size_px}x{self.size_px} px at 0.5 µm/px, seed 81",
            "timed": "the whole child process; 'analysis s' is analyse_slide alone (best run), 'CPU s' its CPU time "
            "(median)",
            "models": "copies of the shipped demo models (segmentation M=5, nuclei M=2), precision auto",
            "torch": f"{torch.__version__}, {torch.get_num_threads()} threads by default",
            "load": "0, 1, 2 busy-loop processes beside the child",
        }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Child process of the cpu_contention benchmark.")
    parser.add_argument("--child", nargs=3, metavar=("SLIDE", "MODELS_DIR", "OUT_JSON"), required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    _child(Path(args.child[0]), Path(args.child[1]), Path(args.child[2]), threads=args.threads)
