"""``pdl1 run``'s analysis of one phantom H&E with the members on eager PyTorch vs OpenVINO (issue #35).

Each case is a child process (``python -m benchmarks.runtimes --child``) that makes ``pdl1``'s allocator
settings, loads copies of the shipped demo models (segmentation M=5, H&E nuclei) from a temporary folder,
puts them on the case's runtime (``Ensemble.on_runtime``: for OpenVINO the conversion or the cache read
and the compilation, timed apart as "runtime set-up"), and runs ``analyse_slide`` as ``pdl1 run`` does
(SUA, nuclei, domain guard; ``precision=auto``). The domain guard listens to the segmentation's member 0,
which then stays on torch: the analysis compiles that variant from the cache itself (tenths of a second inside
"analysis"). The cases, interleaved in rounds:

- torch: every member on eager PyTorch (the baseline);
- openvino: every member on OpenVINO, its IR read from the cache beside the model copies (warm);
- openvino, cold cache: the same with the cache removed first, so the members are converted and checked;
- openvino segmentation, torch nuclei: whether OpenVINO's threads slow eager PyTorch in the same process.

The child writes the result's TPS and nuclei count and the segmentation's probability map; the parent
sets every case's beside the torch case's of the same round: the share of covered map pixels called the
same class (probability against the manifest's threshold) and the largest probability difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from benchmarks import Case, PhantomSlideBenchmark, time_calls

CASES = {
    "torch": ("torch", "torch", False),
    "openvino (warm cache)": ("openvino", "openvino", False),
    "openvino, cold cache": ("openvino", "openvino", True),
    "openvino segmentation, torch nuclei": ("openvino", "torch", False),
}


def _child(slide: Path, models_dir: Path, out: Path, *, seg_runtime: str, nuclei_runtime: str) -> None:
    t_start = time.perf_counter()
    import inference.allocator as allocator

    allocator.tune_allocator()
    from inference import Models, PipelineConfig
    from inference.analysis.nuclei import NucleiConfig
    from inference.analysis.segment import SegmentConfig
    from inference.models.ensemble import Precision

    config = PipelineConfig(
        device="cpu",
        seg_model_dir=str(models_dir / "seg"),
        nuclei_model_dir=str(models_dir / "nuclei"),
        segment=SegmentConfig(runtime=seg_runtime),
        nuclei=NucleiConfig(runtime=nuclei_runtime),
    )
    models = Models(config)
    models.load_he()
    t_loaded = time.perf_counter()
    precision = Precision.choose(config.segment.precision, models.seg.device)
    models.seg.on_runtime(seg_runtime, precision=precision)
    models.nuclei.on_runtime(nuclei_runtime, precision=precision)
    t_runtime = time.perf_counter()

    record = {"imports_and_load_s": t_loaded - t_start, "runtime_setup_s": t_runtime - t_loaded}
    analyse_and_record(slide, models, config, out, record=record, t_start=t_start)


def analyse_and_record(
    slide: Path, models, config, out: Path, *, record: dict, t_start: float, phases: dict[str, float] | None = None
) -> None:
    """A child's analysis of ``slide`` as ``pdl1 run`` makes it, timed: its probability map and coverage saved
    beside ``out`` (``.prob.npy``, ``.covered.npy``, compared with torch's by the parent), and ``out`` written as
    JSON: ``record``, the analysis and each phase in seconds (``segmentation``, ``nuclei`` and any the caller
    timed into ``phases`` with :func:`benchmarks.time_calls`, as ``NAME_s``), the wall time since ``t_start``,
    TPS, nuclei and the segmentation threshold."""
    import inference.pipeline as pipeline

    phases = {} if phases is None else phases
    time_calls(pipeline, "segment_slide", "segmentation", phases)
    time_calls(pipeline, "detect_nuclei", "nuclei", phases)
    t0 = time.perf_counter()
    result = pipeline.analyse_slide(slide, models=models, config=config)
    t_analysis = time.perf_counter() - t0
    np.save(out.with_suffix(".prob.npy"), np.asarray(result.maps.prob))
    np.save(out.with_suffix(".covered.npy"), np.asarray(result.maps.covered))
    out.write_text(
        json.dumps(
            record
            | {"analysis_s": t_analysis}
            | {f"{name}_s": seconds for name, seconds in phases.items()}
            | {
                "wall_s": time.perf_counter() - t_start,
                "tps": None if result.tps is None else result.tps.percent,
                "nuclei": len(result.nuclei.xy),
                "threshold": float(models.seg.manifest.thresholds.get("segmentation", 0.5)),
            }
        )
    )


class Runtimes(PhantomSlideBenchmark):
    """pdl1 run's analysis of an 8192² phantom H&E, members on eager PyTorch vs OpenVINO (child processes)."""

    unit = "Mpx/s"
    secondary_unit = "nuclei/s"
    repeats = 3
    interleave = True  # rounds: load from other jobs falls on all cases alike
    warmup = False  # every run is a fresh process; the warm-cache case is warmed by setup's conversion
    extra_columns = (
        "runtime set-up s",
        "analysis s",
        "segmentation s",
        "nuclei s",
        "analysis x torch",
        "TPS %",
        "nuclei",
        "same class",
        "max |prob diff|",
    )

    def setup(self, *, quick: bool) -> None:
        if not _openvino_installed():
            raise RuntimeError("the runtimes benchmark needs OpenVINO: pip install 'pdl1-bridge[openvino]'")
        from inference.models.ensemble import demo_model_dir

        self.open_phantom(4096 if quick else 8192, seed=81)
        self.models_dir = self.tmp / "models"
        for kind in ("seg", "nuclei"):
            shutil.copytree(demo_model_dir(kind), self.models_dir / kind, ignore=shutil.ignore_patterns(".openvino"))
        self.runs: dict[str, list[dict]] = {}
        self.round_of: dict[str, int] = {}
        # Fill the cache once, so the warm case reads it (the cold case removes it before each of its runs).
        self._child_run("setup", "openvino", "openvino", cold=False)

    def _child_run(self, label: str, seg: str, nuclei: str, *, cold: bool) -> dict:
        if cold:
            for kind in ("seg", "nuclei"):
                shutil.rmtree(self.models_dir / kind / ".openvino", ignore_errors=True)
        n = self.round_of[label] = self.round_of.get(label, -1) + 1
        out = self.tmp / f"{label.replace(' ', '_').replace(',', '')}_{n}.json"
        cmd = [sys.executable, "-m", "benchmarks.runtimes", "--child", str(self.slide.path), str(self.models_dir),
               str(out), "--seg-runtime", seg, "--nuclei-runtime", nuclei]  # fmt: skip
        subprocess.run(cmd, check=True)
        figures = json.loads(out.read_text())
        # Each run's own figures, so the rounds can be paired (the table keeps the best and the median).
        print(f"    {label} run {n + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()
                                                     if k.endswith("_s")), file=sys.stderr)  # fmt: skip
        figures["prob"] = np.load(out.with_suffix(".prob.npy"))
        figures["covered"] = np.load(out.with_suffix(".covered.npy"))
        self.runs.setdefault(label, []).append(figures)
        return figures

    def _case(self, label: str) -> tuple[float, float]:
        seg, nuclei, cold = CASES[label]
        figures = self._child_run(label, seg, nuclei, cold=cold)
        return self.size_px**2 / 1e6, figures["nuclei"]

    def cases(self) -> list[Case]:
        return [
            Case(label, (lambda label=label: self._case(label)), baseline=label == "torch", warmup=False)
            for label in CASES
        ]

    def extra(self, label: str) -> dict[str, str]:
        runs, base = self.runs.get(label, []), self.runs.get("torch", [])
        if not runs:
            return {}
        best = min(runs, key=lambda r: r["analysis_s"])
        same, diff = [], []
        for i, run in enumerate(runs):
            ref = base[min(i, len(base) - 1)] if base else run
            both = run["covered"] & ref["covered"]
            t = ref["threshold"]
            same.append(float(((run["prob"] >= t) == (ref["prob"] >= t))[both].mean()))
            diff.append(float(np.abs(run["prob"] - ref["prob"])[both].max()))
        ratio = ""
        if base:
            ratio = f"{min(r['analysis_s'] for r in base) / best['analysis_s']:.2f}"
        return {
            "runtime set-up s": f"{np.median([r['runtime_setup_s'] for r in runs]):.2f}",
            "analysis s": f"{best['analysis_s']:.2f}",
            "segmentation s": f"{best['segmentation_s']:.2f}",
            "nuclei s": f"{best['nuclei_s']:.2f}",
            "analysis x torch": ratio,
            "TPS %": ", ".join(sorted({f"{r['tps']:.2f}" for r in runs if r["tps"] is not None})),
            "nuclei": ", ".join(sorted({str(r["nuclei"]) for r in runs})),
            "same class": f"{min(same):.4f}",
            "max |prob diff|": f"{max(diff):.3f}",
        }

    def conditions(self) -> dict[str, str]:
        import torch

        return {
            "device": "cpu",
            "slide": f"phantom {self.size_px}x{self.size_px} px at 0.5 µm/px, seed 81",
            "timed": "the whole child process; 'analysis s' is analyse_slide alone (best run), 'runtime set-up s' "
            "the conversion (cold) or cache read and compilation (median)",
            "models": "copies of the shipped demo models (segmentation M=5, nuclei M=2), precision auto",
            "torch threads": str(torch.get_num_threads()),
            "openvino": _openvino_version(),
        }


def _openvino_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("openvino") is not None


def _openvino_version() -> str:
    try:
        return version("openvino")
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    # As pdl1 starts (bridge.cli.app), before torch loads: with libgomp's default spin count PyTorch's idle
    # OpenMP threads spin beside OpenVINO's and slow its nuclei forward passes by a quarter.
    from inference.openmp import tune_openmp

    tune_openmp()
    parser = argparse.ArgumentParser(description="Child process of the runtimes benchmark.")
    parser.add_argument("--child", nargs=3, metavar=("SLIDE", "MODELS_DIR", "OUT_JSON"), required=True)
    parser.add_argument("--seg-runtime", default="torch")
    parser.add_argument("--nuclei-runtime", default="torch")
    args = parser.parse_args()
    _child(
        Path(args.child[0]),
        Path(args.child[1]),
        Path(args.child[2]),
        seg_runtime=args.seg_runtime,
        nuclei_runtime=args.nuclei_runtime,
    )
