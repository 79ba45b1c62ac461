"""Segmentation ensemble on a CUDA GPU: M=1, 5 and 8, GPU utilisation and read wait, vs a naive baseline.

Two member sizes: the shipped demo U-Net (what ``pdl1 run`` uses) and an nnU-Net-sized
PlainConvUNet (features 32..512, 512 px tiles at 1 µm/px, random weights: speed does not
depend on them), on which the GPU, not reading, sets the pace. For every case the table
shows the mean GPU utilisation NVML reported while it ran, the share of wall time the
inference loop waited for tiles (reading starving the GPU), and its wall time against M=1
of the same model. "read only" runs the same tile reads with no model: the ceiling reading
puts on every other row.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from pathlib import Path

import torch

from benchmarks import Case, PhantomSlideBenchmark
from inference.ensemble import Ensemble, Precision, demo_model_dir
from inference.segment import SegmentConfig, SegmentProfile, plan_tiles, segment_slide
from inference.tiling import read_grid_tiles
from inference.unet import build_model

BIG_FEATURES = (32, 64, 128, 256, 512, 512)


class _UtilisationSampler:
    """Mean GPU utilisation (NVML, percent) over a block of work, sampled every 50 ms."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
        except Exception:
            self._read = None
        self.samples: list[float] = []
        self._stop = threading.Event()

    def __enter__(self) -> _UtilisationSampler:
        self.samples = []
        self._stop.clear()
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(float(self._read()))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._read is not None:
            self._thread.join()

    @property
    def mean(self) -> str:
        return f"{statistics.fmean(self.samples):.0f}" if self.samples else ""


class SegGpu(PhantomSlideBenchmark):
    """Segmentation ensemble on CUDA: Mpx/s for M=1, 5, 8, GPU utilisation and read wait vs naive M=5."""

    unit = "Mpx/s"
    repeats = 2
    extra_columns = ("GPU busy %", "read wait %", "time / M=1")

    def setup(self, *, quick: bool) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("seg_gpu needs a CUDA GPU (torch sees none); on the CPU run seg_inference")
        self.device = torch.device("cuda")
        self.open_phantom(4096 if quick else 12288, seed=77)
        demo = Ensemble.load(demo_model_dir("seg"), task="segmentation", device=self.device)
        big_manifest = dataclasses.replace(
            demo.manifest,
            name="nnU-Net-sized",
            architecture_kwargs={**demo.manifest.architecture_kwargs, "features": list(BIG_FEATURES)},
            tile_size_px=512,
            input_mpp=1.0,
        )
        torch.manual_seed(0)
        big_members = [
            build_model(big_manifest.architecture, big_manifest.architecture_kwargs).to(self.device).eval()
            for _ in range(8)
        ]
        self.members = {"demo": [demo.members[i % len(demo.members)] for i in range(8)], "big": big_members}
        self.manifests = {"demo": demo.manifest, "big": big_manifest}
        self.batch = {"demo": 32, "big": 16}
        self.sampler = _UtilisationSampler()
        self.extras: dict[str, dict[str, str]] = {}
        self.wall_m1: dict[str, float] = {}
        self._compiled: dict[tuple[str, int], Ensemble] = {}
        self.precision = Precision.choose("auto", self.device)

    def _ensemble(self, model: str, m: int, *, compiled: bool = False) -> Ensemble:
        if compiled:  # compiled once; the warm-up run pays for the compilation
            key = (model, m)
            if key not in self._compiled:
                self._compiled[key] = self._ensemble(model, m).compile()
            return self._compiled[key]
        return Ensemble(self.manifests[model], self.members[model][:m], folder=Path("."), device=self.device)

    @property
    def mpx(self) -> float:
        return self.size_px**2 / 1e6

    def _run(
        self,
        label: str,
        model: str,
        m: int,
        *,
        compiled: bool = False,
        block_tiles: int | None = None,
        openslide_only: bool = False,
        readers_average: bool = False,
    ) -> float:
        config = self._config(model, block_tiles=block_tiles, readers_average=readers_average)
        slide = self.openslide_only() if openslide_only else self.slide
        ens = self._ensemble(model, m, compiled=compiled)
        profile = SegmentProfile()
        with self.sampler:
            t0 = time.perf_counter()
            segment_slide(slide, ens, tissue=self.tissue, config=config, profile=profile)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        if m == 1 and not compiled and block_tiles is None and not openslide_only and not readers_average:
            self.wall_m1[model] = wall
        ratio = f"{wall / self.wall_m1[model]:.2f}" if model in self.wall_m1 else ""
        self.extras[label] = {
            "GPU busy %": self.sampler.mean,
            "read wait %": f"{100 * profile.read_wait_fraction:.0f}",
            "time / M=1": ratio,
        }
        return self.mpx

    def _naive(self, label: str) -> float:
        # Member after member, one tile per forward pass, reading in the calling thread, fp32,
        # maps accumulated on the host: the shape of a straightforward first implementation.
        naive = SegmentConfig(batch_size=1, read_workers=0, precision="fp32", accumulate_on="host")
        profile = SegmentProfile()
        with self.sampler:
            for member in self.members["big"][:5]:
                single = Ensemble(self.manifests["big"], [member], folder=Path("."), device=self.device)
                segment_slide(self.slide, single, tissue=self.tissue, config=naive, profile=profile)
        self.extras[label] = {"GPU busy %": self.sampler.mean}
        return self.mpx

    def _config(self, model: str, *, block_tiles: int | None, readers_average: bool) -> SegmentConfig:
        config = SegmentConfig(batch_size=self.batch[model], reduce_on_device=False if readers_average else None)
        return config if block_tiles is None else dataclasses.replace(config, read_block_tiles=block_tiles)

    def _read_only(
        self,
        label: str,
        model: str,
        *,
        block_tiles: int | None = None,
        openslide_only: bool = False,
        readers_average: bool = False,
    ) -> float:
        manifest = self.manifests[model]
        ens = self._ensemble(model, 1)
        config = self._config(model, block_tiles=block_tiles, readers_average=readers_average)
        grid = plan_tiles(self.slide, ens, roi=None, tissue=self.tissue, config=config)
        # What segment_slide reads: the level's pixels where the GPU averages them.
        reduction = self.slide.integer_reduction(manifest.input_mpp)
        box_factor = 1 if readers_average or reduction is None else reduction[1]
        tiles = read_grid_tiles(
            self.openslide_only() if openslide_only else self.slide,
            grid,
            mpp=manifest.input_mpp,
            workers=config.workers_for(self.device),
            block_tiles=config.read_block_tiles,
            max_pending_tiles=2 * config.batch_size,
            box_factor=box_factor,
        )
        for _ in tiles:
            pass
        self.extras[label] = {"read wait %": "100"}
        return self.mpx

    def cases(self) -> list[Case]:
        naive = "naive M=5 nnU-Net-sized (member by member, batch 1, no read-ahead, fp32)"
        cases = []
        for model, name in (("demo", "demo U-Net"), ("big", "nnU-Net-sized")):
            label = f"read only, {name} tiles"
            cases.append(Case(label, lambda label=label, model=model: self._read_only(label, model)))
            for m in (1, 5, 8):
                label = f"ours M={m}, {name}"
                cases.append(Case(label, lambda label=label, model=model, m=m: self._run(label, model, m)))
        # The readers before (same run): 3 x 3 blocks averaged by the reading threads; and the
        # first reader, every tile on its own through OpenSlide.
        # label=label: each case keeps its own label (a plain closure would see the last one).
        before = "readers average (before)"
        first = "OpenSlide, per-tile reads, readers average (first reader)"
        label = f"read only, nnU-Net-sized tiles, {before}"
        cases.append(Case(label, lambda label=label: self._read_only(label, "big", readers_average=True)))
        label = f"read only, nnU-Net-sized tiles, {first}"
        cases.append(
            Case(
                label,
                lambda label=label: self._read_only(
                    label, "big", block_tiles=1, openslide_only=True, readers_average=True
                ),
            )
        )
        label = f"ours M=1, nnU-Net-sized, {before}"
        cases.append(Case(label, lambda label=label: self._run(label, "big", 1, readers_average=True)))
        label = f"ours M=1, nnU-Net-sized, {first}"
        cases.append(
            Case(
                label,
                lambda label=label: self._run(
                    label, "big", 1, block_tiles=1, openslide_only=True, readers_average=True
                ),
            )
        )
        label = "ours M=5, nnU-Net-sized, torch.compile"
        cases.append(Case(label, lambda label=label: self._run(label, "big", 5, compiled=True)))
        # Last, so that CUDA and cuDNN start-up were paid by the warm-ups before; no warm-up of its own.
        cases.append(Case(naive, lambda: self._naive(naive), baseline=True, warmup=False))
        return cases

    def extra(self, label: str) -> dict[str, str]:
        return self.extras.get(label, {})

    def conditions(self) -> dict[str, str]:
        demo, big = self.manifests["demo"], self.manifests["big"]
        workers = SegmentConfig().workers_for(self.device)
        return {
            "device": torch.cuda.get_device_name(self.device),
            "torch": torch.__version__,
            "precision": "bf16 autocast, fp32 accumulators on the GPU" if self.precision.autocast_dtype else "fp32",
            "slide": f"phantom {self.size_px}x{self.size_px} px at 0.5 µm/px, tissue only",
            "demo U-Net": f"{demo.architecture_kwargs['features']}, {demo.tile_size_px} px at {demo.input_mpp} µm/px, "
            f"batch {self.batch['demo']}",
            "nnU-Net-sized": f"{list(BIG_FEATURES)}, {big.tile_size_px} px at {big.input_mpp} µm/px, "
            f"batch {self.batch['big']}",
            "read threads": str(workers),
            "reads": f"JPEG tiles decoded directly, blocks of {SegmentConfig().read_block_tiles}x"
            f"{SegmentConfig().read_block_tiles} tiles; level 0 averaged to 1 µm/px on the GPU (nnU-Net-sized)",
            "overlap": str(SegmentConfig().overlap_fraction),
        }
