"""PD-L1 IHC cells end to end: the IHC nuclei ensemble on an IHC phantom, with and without membrane grading."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from benchmarks import Case, PhantomSlideBenchmark
from inference.analysis.nuclei import NucleiConfig, detect_nuclei
from inference.models.ensemble import Ensemble, demo_model_dir
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.slides.slide import open_slide
from inference.slides.tissue import tissue_mask_for_slide


class IhcNuclei(PhantomSlideBenchmark):
    """PD-L1 IHC nuclei: level-0 Mpx/s and nuclei/s of the IHC ensemble, against the H&E nuclei model."""

    unit = "Mpx/s"
    secondary_unit = "nuclei/s"

    def setup(self, *, quick: bool) -> None:
        size, seed = (2048 if quick else 4096), 79
        self.open_phantom(size, seed=seed, ihc=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.ihc = Ensemble.load(demo_model_dir("nuclei-ihc"), task="nuclei", device=device)
        # The same members without the membrane DAB measurement: what grading costs.
        self.ungraded = copy.copy(self.ihc)
        self.ungraded.manifest = replace(self.ihc.manifest, stain="H&E")
        self.he_model = Ensemble.load(demo_model_dir("nuclei"), task="nuclei", device=device)
        he_path = self.tmp / "he.svs"
        write_phantom(he_path, PhantomSpec(size, size, seed=seed))
        self.he_slide = open_slide(he_path)
        self.he_tissue = tissue_mask_for_slide(self.he_slide)
        self.config = NucleiConfig()

    def _run(self, ensemble: Ensemble, slide, tissue) -> tuple[float, float]:
        nuclei = detect_nuclei(slide, ensemble, tissue=tissue, config=self.config)
        return self.size_px**2 / 1e6, len(nuclei)

    def cases(self) -> list[Case]:
        return [
            Case(
                "H&E nuclei model on the H&E section (3 classes, 2 members)",
                lambda: self._run(self.he_model, self.he_slide, self.he_tissue),
                baseline=True,
            ),
            Case(
                "IHC ensemble on the IHC section (5 classes, 3 members), graded",
                lambda: self._run(self.ihc, self.slide, self.tissue),
            ),
            Case(
                "IHC ensemble, membrane DAB not measured",
                lambda: self._run(self.ungraded, self.slide, self.tissue),
            ),
        ]

    def conditions(self) -> dict[str, str]:
        m = self.ihc.manifest
        return {
            "device": str(self.ihc.device),
            "slides": f"phantom pair {self.size_px}x{self.size_px} px at 0.5 µm/px (seed 79), tissue only",
            "model": f"{m.name} {m.architecture} ({len(m.members)} members), {m.input_mpp} µm/px",
            "batch": str(self.config.batch_for(self.ihc.device)),
        }

    def teardown(self) -> None:
        self.he_slide.close()
        super().teardown()
