"""Our ensemble inference against the peers a user would pick instead, on the same members and region.

The peers are nnU-Net v2's ``nnUNetPredictor`` and MONAI's ``SlidingWindowInferer``. Both are
benchmark-only dependencies; install them after torch is pinned, so pip cannot pull a CUDA
torch, then drop the two packages whose CUDA builds fail to import (the predictor does not need
them)::

    pip install -c benchmarks/nnunet-constraints.txt nnunetv2 monai
    pip uninstall -y torchvision timm

Every row gets the same input: one region of a phantom slide, read once at the model's MPP and
normalised the same way, and the same M members. nnU-Net runs them as trained (its networks
keep their BatchNorms; it loads each member's state dict into one module in turn), one full
sliding window per member, one tile per forward pass, and averages logits. MONAI's inferer gets
a predictor that runs every member on its batch of tiles and returns what ours computes per tile
(mean softmax, predictive and expected entropy, mutual information, std), which the inferer
blends with its Gaussian; the members get channels-last input, as ours do. Ours runs the members
with their BatchNorms folded (``Ensemble.load``'s default).

The rows are timed interleaved: every repeat runs every row once, in turn, so that a change in
the machine's load falls on all rows alike. Beside the throughput each row shows the network
work it did (the members' convolution FLOPs, counted per tile and multiplied by the member
forward passes the row actually made), the rate at which it did it, and that rate as a share of
a plain channels-last convolution stack measured in the same process at the row's precision: how
far each row is from what this machine's convolutions can do.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks import Benchmark, Case, cycled
from inference.analysis.segment import SegmentConfig, segment_slide
from inference.analysis.uncertainty import ensemble_stats
from inference.models.ensemble import Ensemble, Precision, demo_model_dir
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.slides.reader import ArrayReader
from inference.slides.slide import Mpp, Slide, open_slide

MEMBERS = 5
OVERLAP = 0.5  # nnU-Net's step 0.5; the peers and ours run the same tiles at this overlap
INSTALL_HINT = (
    "nnU-Net v2 and MONAI are benchmark-only dependencies: "
    "pip install -c benchmarks/nnunet-constraints.txt nnunetv2 monai && pip uninstall -y torchvision timm"
)


def conv_flops_per_tile(model: nn.Module, tile_px: int, *, in_channels: int = 3) -> float:
    """Multiply-add FLOPs (2 per MAC) of the convolutions of ``model`` on one ``tile_px``² tile.

    Counted from the output shapes seen by forward hooks: the convolutions are nearly all of a
    U-Net's work; activations, pooling and concatenations are left out.
    """
    total = 0.0

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.ConvTranspose2d):
            # Each input pixel is scattered into k x k outputs for every output channel.
            in_px = _inputs[0].shape[-2] * _inputs[0].shape[-1]
            k = module.kernel_size[0] * module.kernel_size[1]
            total += 2.0 * in_px * module.in_channels * module.out_channels * k / module.groups
        else:
            k = module.kernel_size[0] * module.kernel_size[1]
            total += 2.0 * output.numel() * module.in_channels * k / module.groups

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, in_channels, tile_px, tile_px))
    finally:
        for h in handles:
            h.remove()
    return total


class TileCounter:
    """Counts the tiles each hooked network runs (a forward pre-hook adds the batch size)."""

    def __init__(self, networks: list[nn.Module]):
        self.tiles = 0
        self._handles = [net.register_forward_pre_hook(self._count) for net in {id(n): n for n in networks}.values()]

    def _count(self, _module: nn.Module, inputs: tuple) -> None:
        self.tiles += int(inputs[0].shape[0])

    def take(self) -> int:
        tiles, self.tiles = self.tiles, 0
        return tiles


def conv_ceiling_gflops(*, autocast_dtype: torch.dtype | None, repeats: int = 5) -> float:
    """GFLOP/s of a plain stack of 3x3 channels-last convolutions (32 channels, 128², batch 4).

    A shape of the demo U-Net's middle stages, with nothing but convolutions and ReLUs: what this
    machine's convolutions reach when nothing else is in the way.
    """
    layers = [nn.Conv2d(32, 32, 3, padding=1) for _ in range(6)]
    stack = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU(inplace=True))]).eval()
    stack = stack.to(memory_format=torch.channels_last)
    x = torch.randn(4, 32, 128, 128).contiguous(memory_format=torch.channels_last)
    flops = 6 * 2.0 * 4 * 128 * 128 * 32 * 32 * 9
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            if autocast_dtype is not None:
                with torch.autocast("cpu", dtype=autocast_dtype):
                    stack(x)
            else:
                stack(x)
            if i >= 2:  # two warm-ups
                best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def _nnunet_predictor(network: nn.Module, states: list[dict], *, tile_px: int, device: torch.device):
    """An nnUNetPredictor set up by hand for a 2-class 2D network (no plans folder needed), no mirroring."""
    try:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
    except ImportError as err:  # pragma: no cover - depends on the optional install
        raise RuntimeError(INSTALL_HINT) from err
    plans = PlansManager({"configurations": {}, "plans_name": "pdl1", "dataset_name": "pdl1"})
    configuration = ConfigurationManager({"patch_size": [tile_px, tile_px], "architecture": {}})
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice about CPU devices
        predictor = nnUNetPredictor(
            tile_step_size=OVERLAP,
            use_gaussian=True,
            use_mirroring=False,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            allow_tqdm=False,
        )
    predictor.manual_initialization(
        network,
        plans,
        configuration,
        states,
        {"labels": {"background": 0, "PD-L1 positive": 1}},
        "pdl1-bridge",
        (0, 1),
    )
    return predictor


def _monai_inferer(tile_px: int, batch: int, device: torch.device):
    try:
        from monai.inferers import SlidingWindowInferer
    except ImportError as err:  # pragma: no cover - depends on the optional install
        raise RuntimeError(INSTALL_HINT) from err
    return SlidingWindowInferer(
        roi_size=(tile_px, tile_px), sw_batch_size=batch, overlap=OVERLAP, mode="gaussian", device=device
    )


class Peers(Benchmark):
    """Our M=5 ensemble inference vs nnU-Net v2's predictor and MONAI's inferer on the same members and region."""

    unit = "Mpx/s"
    repeats = 3
    interleave = True
    extra_columns = ("same class", "GFLOP", "GFLOP/s", "% of ceiling", "time / M=1")

    def setup(self, *, quick: bool) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        demo = Ensemble.load(demo_model_dir("seg"), task="segmentation", device=str(self.device))
        self.ensemble = Ensemble(demo.manifest, cycled(demo.members, MEMBERS), folder=demo.folder, device=demo.device)
        self.single = Ensemble(demo.manifest, demo.members[:1], folder=demo.folder, device=demo.device)
        m = demo.manifest
        self.tile_px = m.tile_size_px
        size_px = 4096 if quick else 8192
        self.tmp = Path(tempfile.mkdtemp(prefix="pdl1-bench-"))
        path = self.tmp / "bench.svs"
        write_phantom(path, PhantomSpec(size_px, size_px, seed=80))
        with open_slide(path) as slide:
            rgb = slide.thumbnail(mpp=m.input_mpp)  # the whole region at the model's MPP, read once
        self.rgb = np.ascontiguousarray(rgb)
        self.region = Slide(ArrayReader(self.rgb), mpp=Mpp(m.input_mpp, m.input_mpp, "benchmark"))
        mean = np.asarray(m.normalization["mean"], np.float32)
        std = np.asarray(m.normalization["std"], np.float32)
        x = (self.rgb.astype(np.float32) / 255 - mean) / std
        chw = np.ascontiguousarray(x.transpose(2, 0, 1))
        self.nnunet_input = torch.from_numpy(chw[:, None])  # (c, 1, H, W): nnU-Net's 2D layout
        self.monai_input = torch.from_numpy(chw[None])  # (1, c, H, W)

        trained = Ensemble.load(demo_model_dir("seg"), task="segmentation", device=str(self.device), fold_bn=False)
        nets = cycled(trained.members, MEMBERS)
        states = [{k: v.detach().clone() for k, v in net.state_dict().items()} for net in nets]
        self.nnunet_network = copy.deepcopy(nets[0])
        self.nnunet = _nnunet_predictor(self.nnunet_network, states, tile_px=self.tile_px, device=self.device)

        self.batch_default = SegmentConfig().batch_for(self.device)
        self.monai = _monai_inferer(self.tile_px, self.batch_default, self.device)
        # nnU-Net autocasts on CUDA only; on the CPU the compared rows run fp32, and bf16 autocast
        # (ours and, in its predictor, MONAI's) gets rows of its own.
        self.same = "auto" if self.device.type == "cuda" else "fp32"
        self.auto = Precision.choose("auto", self.device)
        self.configs: dict[tuple[float, str, int], SegmentConfig] = {}

        self.flops_per_tile = conv_flops_per_tile(copy.deepcopy(trained.members[0]).cpu(), self.tile_px)
        self.counter = TileCounter([*self.ensemble.members, self.nnunet_network])
        self.ceiling = {"fp32": conv_ceiling_gflops(autocast_dtype=None)}
        if self.auto.autocast_dtype is not None and self.device.type == "cpu":
            self.ceiling["bf16"] = conv_ceiling_gflops(autocast_dtype=self.auto.autocast_dtype)
        self.reference = self._ours_prob(OVERLAP, self.same, 8, self.ensemble) >= 0.5
        self.counter.take()
        self.figures: dict[str, dict[str, str]] = {}
        self.seconds: dict[str, float] = {}

    @property
    def mpx(self) -> float:
        return self.rgb.shape[0] * self.rgb.shape[1] / 1e6

    def _config(self, overlap: float, precision: str, batch: int) -> SegmentConfig:
        key = (overlap, precision, batch)
        if key not in self.configs:
            self.configs[key] = SegmentConfig(
                batch_size=batch, read_workers=2, overlap_fraction=overlap, map_downsample=1, precision=precision
            )
        return self.configs[key]

    def _ours_prob(self, overlap: float, precision: str, batch: int, ensemble: Ensemble) -> np.ndarray:
        maps = segment_slide(self.region, ensemble, config=self._config(overlap, precision, batch))
        h, w = self.rgb.shape[:2]
        return np.asarray(maps.prob)[:h, :w]

    def _record(self, label: str, positive: np.ndarray, seconds: float, precision: str) -> float:
        tiles = self.counter.take()
        gflop = tiles * self.flops_per_tile / 1e9
        rate = gflop / seconds
        ceiling = self.ceiling.get(precision, self.ceiling["fp32"])
        self.seconds[label] = min(seconds, self.seconds.get(label, float("inf")))
        best = self.figures.get(label, {})
        if not best or rate > float(best["GFLOP/s"]):
            self.figures[label] = {
                "same class": f"{(positive == self.reference).mean():.4f}",
                "GFLOP": f"{gflop:.0f}",
                "GFLOP/s": f"{rate:.1f}",
                "% of ceiling": f"{100 * rate / ceiling:.0f}",
            }
        return self.mpx

    def _ours(self, label: str, *, overlap: float, precision: str, batch: int, members: int = MEMBERS) -> float:
        ensemble = self.ensemble if members == MEMBERS else self.single
        self.counter.take()
        t0 = time.perf_counter()
        prob = self._ours_prob(overlap, precision, batch, ensemble)
        seconds = time.perf_counter() - t0
        return self._record(label, prob >= 0.5, seconds, "bf16" if precision == "auto" else precision)

    def _nnunet(self, label: str) -> float:
        self.counter.take()
        t0 = time.perf_counter()
        logits = self.nnunet.predict_logits_from_preprocessed_data(self.nnunet_input)  # (2, 1, H, W), mean logits
        seconds = time.perf_counter() - t0
        return self._record(label, (logits[1, 0] > logits[0, 0]).numpy(), seconds, "fp32")

    def _monai(self, label: str, *, bf16: bool) -> float:
        members = self.ensemble.members

        def predictor(x: torch.Tensor) -> torch.Tensor:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = [member(x).float() for member in members]
            probs = torch.softmax(torch.stack(logits), dim=2)  # (M, B, C, H, W)
            return ensemble_stats(probs, positive_class=1)  # (B, 5, H, W): prob, PE, EE, MI, std

        self.counter.take()
        t0 = time.perf_counter()
        with torch.inference_mode():
            maps = self.monai(self.monai_input.to(self.device), predictor)
        seconds = time.perf_counter() - t0
        return self._record(label, (maps[0, 0] >= 0.5).cpu().numpy(), seconds, "bf16" if bf16 else "fp32")

    def cases(self) -> list[Case]:
        same, b = self.same, self.batch_default
        half = OVERLAP

        def ours(overlap: float, precision: str, batch: int, members: int = MEMBERS):
            return lambda label: self._ours(label, overlap=overlap, precision=precision, batch=batch, members=members)

        rows = [
            ("nnU-Net v2 predictor, step 0.5, no mirroring", self._nnunet),
            (
                f"MONAI SlidingWindowInferer, overlap 0.5, batch {b}, {same}",
                lambda label: self._monai(label, bf16=False),
            ),
            (f"ours M=1, overlap 0.5, batch {b}, {same}", ours(half, same, b, members=1)),
            (f"ours, overlap 0.5, batch 8 (before), {same}", ours(half, same, 8)),
            (f"ours, overlap 0.5, batch {b}, {same}", ours(half, same, b)),
        ]
        if same == "fp32" and self.auto.autocast_dtype is not None:
            bf16 = "bf16 autocast"
            rows += [
                (f"MONAI SlidingWindowInferer, overlap 0.5, batch {b}, {bf16} in its predictor",
                 lambda label: self._monai(label, bf16=True)),
                (f"ours M=1, overlap 0.5, batch {b}, {bf16}", ours(half, "auto", b, members=1)),
                (f"ours, overlap 0.5, batch {b}, {bf16}", ours(half, "auto", b)),
                (f"ours, overlap 0.25 (pdl1 run's default), batch {b}, {bf16}", ours(0.25, "auto", b)),
            ]  # fmt: skip
        return [Case(label, (lambda f=f, label=label: f(label)), baseline=i == 0) for i, (label, f) in enumerate(rows)]

    def extra(self, label: str) -> dict[str, str]:
        figures = dict(self.figures.get(label, {}))
        if label.startswith("ours, overlap 0.5, batch"):
            # M=5's wall time against M=1's at the same batch and precision (the goal: <= 0.8 x 5).
            suffix = label.removeprefix("ours, overlap 0.5, ")
            single = self.seconds.get(f"ours M=1, overlap 0.5, {suffix}")
            if single and label in self.seconds:
                figures["time / M=1"] = f"{self.seconds[label] / single:.2f}"
        return figures

    def conditions(self) -> dict[str, str]:
        m = self.ensemble.manifest
        from importlib.metadata import version

        ceiling = ", ".join(f"{k} {v:.0f}" for k, v in self.ceiling.items())
        return {
            "device": str(self.device),
            "precision": "autocast on CUDA (all)" if self.device.type == "cuda" else "fp32 unless the row says",
            "torch threads": str(torch.get_num_threads()),
            "region": f"{self.rgb.shape[1]}x{self.rgb.shape[0]} px at {m.input_mpp} µm/px (all of it, no tissue skip)",
            "members": f"{MEMBERS} x {m.architecture} {m.architecture_kwargs['features']}",
            "network work": f"{self.flops_per_tile / 1e9:.2f} GFLOP (convolutions) per member and {self.tile_px}² tile",
            "ceiling GFLOP/s (plain channels-last 3x3 conv stack)": ceiling,
            "tiles": f"{self.tile_px} px; nnU-Net batch 1; MONAI and ours as the row says",
            "nnunetv2": version("nnunetv2"),
            "monai": version("monai"),
            "outputs": "ours and MONAI: mean softmax + 4 uncertainty maps; nnU-Net: mean logits",
            "timing": f"interleaved, {self.repeats} rounds after a warm-up round",
        }

    def teardown(self) -> None:
        self.region.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
