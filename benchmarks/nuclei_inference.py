"""Nuclei detection: max-pool NMS vs skimage peak_local_max on the same heatmaps, and end to end."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from skimage.feature import peak_local_max

from benchmarks import Case, PhantomSlideBenchmark
from inference.analysis.nuclei import NucleiConfig, _member_heatmaps, detect_nuclei, heatmap_peaks
from inference.analysis.tiling import tile_grid
from inference.models.ensemble import Ensemble, Precision, demo_model_dir


class NucleiInference(PhantomSlideBenchmark):
    """Nuclei: peak finding Mpx/s and nuclei/s (ours vs skimage.peak_local_max), and end to end."""

    unit = "Mpx/s"
    secondary_unit = "nuclei/s"

    def setup(self, *, quick: bool) -> None:
        self.open_phantom(2048 if quick else 4096, seed=78)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.ensemble = Ensemble.load(demo_model_dir("nuclei"), task="nuclei", device=device)
        self.unfolded = Ensemble.load(demo_model_dir("nuclei"), task="nuclei", device=device, fold_bn=False)
        self.config = NucleiConfig()
        m = self.ensemble.manifest
        self.radius_px = max(1, round(self.config.nms_radius_um / m.input_mpp))
        self.min_score = self.config.min_score_for(m)
        grid = tile_grid(
            image_size_wh=self.slide.dimensions,
            tile_size_px=m.tile_size_px,
            overlap_px=0,
            downsample=m.input_mpp / self.slide.mpp.mean,
            tissue_mask=self.tissue.mask,
            tissue_downsample=self.tissue.downsample,
        )
        precision = Precision.choose("auto", self.ensemble.device)
        self.heatmaps = []
        for i in range(0, len(grid), 8):
            tiles = np.stack(
                [
                    self.slide.read_region_at_mpp((int(x), int(y)), (m.tile_size_px,) * 2, mpp=m.input_mpp)
                    for x, y in grid.origins_xy[i : i + 8]
                ]
            )
            self.heatmaps.append(_member_heatmaps(self.ensemble, tiles, precision, tta=False).mean(dim=0))
        self.heat_mpx = sum(h.shape[0] * h.shape[2] * h.shape[3] for h in self.heatmaps) / 1e6

    def _ours_nms(self) -> tuple[float, float]:
        n = 0
        for heat in self.heatmaps:
            b, y, x = heatmap_peaks(heat, radius_px=self.radius_px, min_score=self.min_score)
            classes = heat[b, :, y, x].argmax(dim=1)  # class at each peak, as detect_nuclei does
            n += len(classes)
        return self.heat_mpx, n

    def _skimage(self) -> tuple[float, float]:
        n = 0
        for heat in self.heatmaps:
            arr = heat.cpu().numpy()
            for tile in arr:
                top = tile.max(axis=0)
                peaks = peak_local_max(
                    top, min_distance=self.radius_px, threshold_abs=self.min_score, exclude_border=False
                )
                classes = tile[:, peaks[:, 0], peaks[:, 1]].argmax(axis=0)
                n += len(classes)
        return self.heat_mpx, n

    def _end_to_end(self, *, fold_bn: bool = True, batch_size: int | None = None) -> tuple[float, float]:
        ensemble = self.ensemble if fold_bn else self.unfolded
        config = self.config if batch_size is None else replace(self.config, batch_size=batch_size)
        nuclei = detect_nuclei(self.slide, ensemble, tissue=self.tissue, config=config)
        return self.size_px**2 / 1e6, len(nuclei)

    def cases(self) -> list[Case]:
        return [
            Case("peak finding: skimage peak_local_max", self._skimage, baseline=True),
            Case("peak finding: ours (max-pool NMS)", self._ours_nms),
            Case("end to end: ours (read + FCN + NMS), level-0 Mpx", self._end_to_end),
            Case("end to end, BatchNorm not folded (before)", lambda: self._end_to_end(fold_bn=False)),
            Case("end to end, 8 tiles per pass (the CPU's before)", lambda: self._end_to_end(batch_size=8)),
        ]

    def conditions(self) -> dict[str, str]:
        m = self.ensemble.manifest
        return {
            "device": str(self.ensemble.device),
            "slide": f"phantom {self.size_px}x{self.size_px} px at 0.5 µm/px, tissue only",
            "model": f"{m.name} {m.architecture} ({len(m.members)} members), {m.input_mpp} µm/px",
            "tile": f"{m.tile_size_px} px",
            "batch": str(self.config.batch_for(self.ensemble.device)),
            "heatmaps": f"{self.heat_mpx:.1f} Mpx, NMS radius {self.radius_px} px",
        }
