"""Segmentation ensemble on a CUDA GPU: M=1, 5 and 8, GPU utilisation and read wait, vs a naive baseline.

Two member sizes: the shipped demo U-Net (what ``pdl1 run`` uses) and an nnU-Net-sized
PlainConvUNet (features 32..512, 512 px tiles at 1 µm/px, random weights: speed does not
depend on them), on which the GPU, not reading, sets the pace. For every case the table
shows the mean GPU utilisation NVML reported while it ran, the share of wall time the
inference loop waited for tiles (reading starving the GPU), and its wall time against M=1
of the same model (compiled rows against compiled M=1). "read only" runs the same tile
reads with no model: the ceiling reading puts on every other row. With nvImageCodec
installed the GPU decodes the JPEG tiles (``SegmentConfig.read_on_device``); rows marked
"JPEG decoded on the CPU (before)" read as without it, in the same run.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import threading
import time
from pathlib import Path

import torch

from benchmarks import Case, PhantomSlideBenchmark, cycled
from inference.analysis.segment import SegmentConfig, SegmentProfile, plan_reads, plan_tiles, segment_slide
from inference.models.ensemble import Ensemble, Precision, demo_model_dir
from inference.models.fusion import fold_batchnorm
from inference.models.unet import build_model
from inference.slides.gpu_decode import nvimgcodec_available

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
        # As Ensemble.load does; "big-bn" keeps the BatchNorms for the rows that measure folding.
        unfolded = [copy.deepcopy(m) for m in big_members[:5]]
        for member in big_members:
            fold_batchnorm(member)
        self.members = {
            "demo": cycled(demo.members, 8),
            "big": big_members,
            "big-bn": unfolded,
        }
        self.manifests = {"demo": demo.manifest, "big": big_manifest, "big-bn": big_manifest}
        self.batch = {"demo": 32, "big": 16, "big-bn": 16}
        self.sampler = _UtilisationSampler()
        self.extras: dict[str, dict[str, str]] = {}
        self.wall_m1: dict[tuple[str, bool], float] = {}  # (model, compiled): M=1 wall time
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

    def _run(self, label: str, model: str, m: int, *, compiled: bool = False, cpu_decoding: bool = False) -> float:
        config = self._config(model, cpu_decoding=cpu_decoding)
        ens = self._ensemble(model, m, compiled=compiled)
        profile = SegmentProfile()
        with self.sampler:
            t0 = time.perf_counter()
            segment_slide(self.slide, ens, tissue=self.tissue, config=config, profile=profile)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        # Compiled runs are compared with compiled M=1: both pay for the same compiler's kernels.
        if m == 1 and not cpu_decoding:
            self.wall_m1[model, compiled] = wall
        ratio = f"{wall / self.wall_m1[model, compiled]:.2f}" if (model, compiled) in self.wall_m1 else ""
        self.extras[label] = {
            "GPU busy %": self.sampler.mean,
            "read wait %": f"{100 * profile.read_wait_fraction:.0f}",
            "time / M=1": ratio,
        }
        return self.mpx

    def _naive(self, label: str) -> float:
        # Member after member, one tile per forward pass, reading in the calling thread, fp32,
        # maps accumulated on the host: the shape of a straightforward first implementation. Its members
        # are folded as Ensemble.load gives them (as in seg_inference), so "x baseline" leaves folding out.
        naive = SegmentConfig(batch_size=1, read_workers=0, precision="fp32", accumulate_on="host")
        profile = SegmentProfile()
        with self.sampler:
            for member in self.members["big"][:5]:
                single = Ensemble(self.manifests["big"], [member], folder=Path("."), device=self.device)
                segment_slide(self.slide, single, tissue=self.tissue, config=naive, profile=profile)
        self.extras[label] = {"GPU busy %": self.sampler.mean}
        return self.mpx

    def _config(self, model: str, *, cpu_decoding: bool = False) -> SegmentConfig:
        return SegmentConfig(batch_size=self.batch[model], read_on_device=False if cpu_decoding else None)

    def _read_only(self, label: str, model: str, *, cpu_decoding: bool = False) -> float:
        # What segment_slide reads, with no model.
        config = self._config(model, cpu_decoding=cpu_decoding)
        ens = self._ensemble(model, 1)
        grid = plan_tiles(self.slide, ens, roi=None, tissue=self.tissue, config=config)
        reads = plan_reads(self.slide, grid, mpp=ens.manifest.input_mpp, device=self.device, config=config)
        for _ in reads.tiles():
            pass
        torch.cuda.synchronize()
        self.extras[label] = {"read wait %": "100"}
        return self.mpx

    def cases(self) -> list[Case]:
        naive = "naive M=5 nnU-Net-sized (member by member, batch 1, no read-ahead, fp32)"
        cpu = "JPEG decoded on the CPU (before)"
        cases = []
        # label=label: each case keeps its own label (a plain closure would see the last one).
        for model, name in (("demo", "demo U-Net"), ("big", "nnU-Net-sized")):
            label = f"read only, {name} tiles"
            cases.append(Case(label, lambda label=label, model=model: self._read_only(label, model)))
            label = f"read only, {name} tiles, {cpu}"
            cases.append(Case(label, lambda label=label, model=model: self._read_only(label, model, cpu_decoding=True)))
            for m in (1, 5, 8):
                label = f"ours M={m}, {name}"
                cases.append(Case(label, lambda label=label, model=model, m=m: self._run(label, model, m)))
        for m in (1, 5):
            label = f"ours M={m}, nnU-Net-sized, {cpu}"
            cases.append(Case(label, lambda label=label, m=m: self._run(label, "big", m, cpu_decoding=True)))
        for m in (1, 5):  # "time / M=1" of these is against unfolded M=1
            label = f"ours M={m}, nnU-Net-sized, BatchNorm not folded (before)"
            cases.append(Case(label, lambda label=label, m=m: self._run(label, "big-bn", m)))
        for m in (1, 5, 8):  # "time / M=1" of these is against compiled M=1
            label = f"ours M={m}, nnU-Net-sized, `torch.compile`"
            cases.append(Case(label, lambda label=label, m=m: self._run(label, "big", m, compiled=True)))
        # Last, so that CUDA and cuDNN start-up were paid by the warm-ups before; no warm-up of its own.
        cases.append(Case(naive, lambda: self._naive(naive), baseline=True, warmup=False))
        return cases

    def extra(self, label: str) -> dict[str, str]:
        return self.extras.get(label, {})

    def conditions(self) -> dict[str, str]:
        demo, big = self.manifests["demo"], self.manifests["big"]
        on_device = nvimgcodec_available()
        workers = SegmentConfig().workers_for(self.device, decoding_on_device=on_device)
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
            "reads": ("JPEG tiles decoded on the GPU (nvImageCodec)" if on_device else "JPEG tiles decoded directly")
            + f", blocks of {SegmentConfig().read_block_tiles}x{SegmentConfig().read_block_tiles} tiles; "
            "level 0 averaged to 1 µm/px on the GPU (nnU-Net-sized)",
            "overlap": str(SegmentConfig().overlap_fraction),
        }
