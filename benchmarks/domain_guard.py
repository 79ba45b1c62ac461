"""What the domain guard costs: a whole analysis (``analyse_slide``, as ``pdl1 run`` runs it) with and without it."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from benchmarks import Case, PhantomSlideBenchmark
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.pipeline import Models, PipelineConfig, analyse_slide
from inference.slides.slide import open_slide


class DomainGuard(PhantomSlideBenchmark):
    """An H&E analysis (segmentation M=5, SUA, nuclei) and a PD-L1 IHC analysis, each with and without the guard."""

    unit = "Mpx/s"
    # CPU seconds of the process (all its threads): on a machine shared with other work the wall time
    # swings by more than the guard costs, the CPU time the analysis itself used much less.
    extra_columns = ("best CPU s", "guard adds (wall)", "guard adds (CPU)")

    def setup(self, *, quick: bool) -> None:
        size, seed = (2048 if quick else 4096), 83
        self.open_phantom(size, seed=seed, ihc=True)
        he_path = self.tmp / "he.svs"
        write_phantom(he_path, PhantomSpec(size, size, seed=seed))
        self.he_slide = open_slide(he_path)
        self.config = PipelineConfig(device="cuda" if torch.cuda.is_available() else "cpu")
        self.models = Models(self.config)
        self.models.ihc()  # loaded before timing, as the service holds it
        self.best_s: dict[str, float] = {}
        self.best_cpu_s: dict[str, float] = {}

    def _run(self, label: str, slide, stain: str, *, guard: bool) -> float:
        config = replace(self.config, domain_guard=guard)
        t0, c0 = time.perf_counter(), time.process_time()
        result = analyse_slide(slide, models=self.models, config=config, image_stain=stain)
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        self.best_s[label] = min(seconds, self.best_s.get(label, float("inf")))
        self.best_cpu_s[label] = min(cpu_s, self.best_cpu_s.get(label, float("inf")))
        if guard and result.summary["domain"]["out_of_domain_score"] is None:
            raise RuntimeError(f"the guard measured nothing: {result.summary['domain']['why_not']}")
        return self.size_px**2 / 1e6

    def cases(self) -> list[Case]:
        def case(label: str, slide, stain: str, *, guard: bool, baseline: bool = False) -> Case:
            return Case(label, lambda: self._run(label, slide, stain, guard=guard), baseline=baseline)

        return [
            case("H&E, no guard", self.he_slide, "H&E", guard=False, baseline=True),
            case("H&E, guard", self.he_slide, "H&E", guard=True),
            case("PD-L1 IHC, no guard", self.slide, "H-DAB", guard=False),
            case("PD-L1 IHC, guard", self.slide, "H-DAB", guard=True),
        ]

    def extra(self, label: str) -> dict[str, str]:
        # Best against best of the same stain without the guard (measured just before).
        out = {"best CPU s": f"{self.best_cpu_s[label]:.2f}"}
        base = label.replace(", guard", ", no guard")
        if label.endswith(", guard") and base in self.best_s:
            out["guard adds (wall)"] = f"{100 * (self.best_s[label] / self.best_s[base] - 1):+.1f} %"
            out["guard adds (CPU)"] = f"{100 * (self.best_cpu_s[label] / self.best_cpu_s[base] - 1):+.1f} %"
        return out

    def conditions(self) -> dict[str, str]:
        seg, ihc = self.models.seg.manifest, self.models.ihc().manifest
        return {
            "device": str(self.models.seg.device),
            "slides": f"phantom pair {self.size_px}x{self.size_px} px at 0.5 µm/px (seed 83), tissue only",
            "models": f"{seg.name} ({len(seg.members)} members, {seg.tile_size_px} px at {seg.input_mpp} µm/px), "
            f"nuclei, {ihc.name} ({len(ihc.members)} members)",
            "batch": f"{self.config.segment.batch_size} (segmentation)",
        }

    def teardown(self) -> None:
        self.he_slide.close()
        super().teardown()
