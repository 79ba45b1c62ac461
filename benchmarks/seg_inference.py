"""End-to-end segmentation ensemble throughput on a phantom slide: ours (M=1, M=5) vs a naive baseline."""

from __future__ import annotations

import torch

from benchmarks import Case, PhantomSlideBenchmark, cycled
from inference.analysis.segment import SegmentConfig, segment_slide
from inference.models.ensemble import Ensemble, Precision, demo_model_dir


class SegInference(PhantomSlideBenchmark):
    """Segmentation ensemble Mpx/s (level-0 px of the slide) for M=1 and M=5 vs naive member-by-member."""

    unit = "Mpx/s"
    repeats = 2

    def setup(self, *, quick: bool) -> None:
        self.open_phantom(2048 if quick else 4096, seed=77)
        demo = Ensemble.load(demo_model_dir("seg"), task="segmentation", device=self.device_name())
        trained = Ensemble.load(demo_model_dir("seg"), task="segmentation", device=demo.device, fold_bn=False)
        # (M, BatchNorms folded) -> M of the demo's members, folded as Ensemble.load does or as trained.
        self.ensembles = {
            (m, fold_bn): Ensemble(ens.manifest, cycled(ens.members, m), folder=ens.folder, device=ens.device)
            for m, fold_bn, ens in ((1, True, demo), (5, True, demo), (5, False, trained))
        }
        self.config = SegmentConfig(batch_size=8, read_workers=2)
        self.precision = Precision.choose(self.config.precision, demo.device)

    @staticmethod
    def device_name() -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def mpx(self) -> float:
        return self.size_px**2 / 1e6

    def _ours(self, m: int, *, fold_bn: bool = True) -> float:
        segment_slide(self.slide, self.ensembles[m, fold_bn], tissue=self.tissue, config=self.config)
        return self.mpx

    def _naive(self) -> float:
        # Members one after another, one tile at a time, reading in the calling thread.
        naive = SegmentConfig(batch_size=1, read_workers=0, precision="fp32")
        ens5 = self.ensembles[5, True]
        for member in ens5.members:
            single = Ensemble(ens5.manifest, [member], folder=ens5.folder, device=ens5.device)
            segment_slide(self.slide, single, tissue=self.tissue, config=naive)
        return self.mpx

    def cases(self) -> list[Case]:
        return [
            Case("naive M=5 (member by member, batch 1, no read-ahead)", self._naive, baseline=True),
            Case("ours M=1", lambda: self._ours(1)),
            Case("ours M=5", lambda: self._ours(5)),
            Case("ours M=5, BatchNorm not folded (before)", lambda: self._ours(5, fold_bn=False)),
        ]

    def conditions(self) -> dict[str, str]:
        m = self.ensembles[1, True].manifest
        return {
            "device": str(self.ensembles[1, True].device),
            "precision": "bf16 autocast" if self.precision.autocast_dtype else "fp32",
            "torch threads": str(torch.get_num_threads()),
            "slide": f"phantom {self.size_px}x{self.size_px} px at 0.5 µm/px, tissue only",
            "model": f"{m.name} {m.architecture} {m.architecture_kwargs['features']}",
            "tiles": f"{m.tile_size_px} px at {m.input_mpp} µm/px, overlap {self.config.overlap_fraction}",
            "batch": str(self.config.batch_size),
        }
