"""What the domain guard costs: a whole analysis (``analyse_slide``, as ``pdl1 run`` runs it) with and without it."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from benchmarks import Case, PhantomSlideBenchmark
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.pipeline import Models, PipelineConfig, analyse_slide
from inference.slides.slide import open_slide


class DomainGuard(PhantomSlideBenchmark):
    """An H&E analysis (segmentation M=5, SUA, nuclei) and a PD-L1 IHC analysis, each without and with the guard.

    Each timed run is a pair: the analysis without the guard, then with it, so both see the same load
    (on a machine shared with other work the wall time swings by more than the guard costs). The
    guard's cost is the median over the pairs of with / without, beside the ratio of the best times.
    """

    unit = "analyses/s"
    repeats = 5
    extra_columns = ("best without s", "best with s", "guard adds (best)", "guard adds (median of pairs)")

    def setup(self, *, quick: bool) -> None:
        size, seed = (2048 if quick else 4096), 83
        self.open_phantom(size, seed=seed, ihc=True)
        he_path = self.tmp / "he.svs"
        write_phantom(he_path, PhantomSpec(size, size, seed=seed))
        self.he_slide = open_slide(he_path)
        self.config = PipelineConfig(device="cuda" if torch.cuda.is_available() else "cpu")
        self.models = Models(self.config)
        self.models.ihc()  # loaded before timing, as the service holds it
        self.pairs: dict[str, list[tuple[float, float]]] = {}

    def _analyse(self, slide, stain: str, *, guard: bool) -> float:
        config = replace(self.config, domain_guard=guard)
        t0 = time.perf_counter()
        result = analyse_slide(slide, models=self.models, config=config, image_stain=stain)
        seconds = time.perf_counter() - t0
        if guard and result.summary["domain"]["out_of_domain_score"] is None:
            raise RuntimeError(f"the guard measured nothing: {result.summary['domain']['why_not']}")
        return seconds

    def _pair(self, label: str, slide, stain: str) -> float:
        without = self._analyse(slide, stain, guard=False)
        with_guard = self._analyse(slide, stain, guard=True)
        self.pairs.setdefault(label, []).append((without, with_guard))
        return 2.0

    def cases(self) -> list[Case]:
        he, ihc = "H&E (without, then with the guard)", "PD-L1 IHC (without, then with the guard)"
        return [
            Case(he, lambda: self._pair(he, self.he_slide, "H&E"), baseline=True),
            Case(ihc, lambda: self._pair(ihc, self.slide, "H-DAB")),
        ]

    def extra(self, label: str) -> dict[str, str]:
        pairs = self.pairs[label][-self.repeats :]  # the timed pairs, not the warm-up
        best_without, best_with = min(p[0] for p in pairs), min(p[1] for p in pairs)
        median = statistics.median(w / wo for wo, w in pairs)
        return {
            "best without s": f"{best_without:.2f}",
            "best with s": f"{best_with:.2f}",
            "guard adds (best)": f"{100 * (best_with / best_without - 1):+.1f} %",
            "guard adds (median of pairs)": f"{100 * (median - 1):+.1f} %",
        }

    def conditions(self) -> dict[str, str]:
        seg, ihc = self.models.seg.manifest, self.models.ihc().manifest
        return {
            "device": str(self.models.seg.device),
            "slides": f"phantom pair {self.size_px}x{self.size_px} px at 0.5 µm/px (seed 83), tissue only",
            "models": f"{seg.name} ({len(seg.members)} members, {seg.tile_size_px} px at {seg.input_mpp} µm/px), "
            f"nuclei, {ihc.name} ({len(ihc.members)} members)",
            "batch": f"{self.config.segment.batch_for(self.models.seg.device)} (segmentation)",
        }

    def teardown(self) -> None:
        self.he_slide.close()
        super().teardown()
