"""Our ensemble inference vs nnU-Net v2's predictor running the same members on the same region.

nnU-Net is a benchmark-only dependency. Install it after torch is pinned, so pip cannot pull a
CUDA torch, then drop the two packages whose CUDA builds fail to import (the predictor does
not need them)::

    pip install -c benchmarks/nnunet-constraints.txt nnunetv2
    pip uninstall -y torchvision timm

Both sides get the same input: one region of a phantom slide, read once at the model's MPP
and normalised the same way, and the same M members (our PlainConvUNet modules, handed to
``nnUNetPredictor.manual_initialization``; nnU-Net loads each member's state dict in turn). nnU-Net
runs them as trained, ours with their BatchNorms folded, as ``Ensemble.load`` does by default.
What differs is the predictor: nnU-Net runs one full sliding window per member, one tile per
forward pass, and averages logits; ours batches tiles, runs every member on each batch, and
accumulates the mean softmax plus four uncertainty maps. The table's last column is the share
of pixels on which both call the same class, which shows that both ran the same members.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks import Benchmark, Case, cycled
from inference.analysis.segment import SegmentConfig, segment_slide
from inference.models.ensemble import Ensemble, Precision, demo_model_dir
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.slides.reader import ArrayReader
from inference.slides.slide import Mpp, Slide, open_slide

MEMBERS = 5
INSTALL_HINT = (
    "nnU-Net v2 is not installed; it is a benchmark-only dependency: "
    "pip install -c benchmarks/nnunet-constraints.txt nnunetv2 && pip uninstall -y torchvision timm"
)


def _nnunet_predictor(network: torch.nn.Module, states: list[dict], *, tile_px: int, mirror: bool, device):
    """An nnUNetPredictor set up by hand for a 2-class 2D network (no plans folder needed)."""
    try:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
    except ImportError as err:  # pragma: no cover - depends on the optional install
        raise RuntimeError(INSTALL_HINT) from err
    plans = PlansManager({"configurations": {}, "plans_name": "pdl1", "dataset_name": "pdl1"})
    configuration = ConfigurationManager({"patch_size": [tile_px, tile_px], "architecture": {}})
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice about CPU devices
        predictor = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=mirror,
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


class NnunetPredictor(Benchmark):
    """Our M=5 ensemble inference vs nnU-Net v2's predictor on the same members and region (Mpx/s, model px)."""

    unit = "Mpx/s"
    repeats = 2
    extra_columns = ("same class as ours",)

    def setup(self, *, quick: bool) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        demo = Ensemble.load(demo_model_dir("seg"), task="segmentation", device=str(self.device))
        self.ensemble = Ensemble(demo.manifest, cycled(demo.members, MEMBERS), folder=demo.folder, device=demo.device)
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
        self.nnunet_input = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[:, None]))  # (c, 1, H, W)
        # nnU-Net runs the members as trained (its networks keep their BatchNorms), ours as
        # Ensemble.load folds them; both compute the same function. nnU-Net loads each member's
        # weights into one module in turn.
        trained = Ensemble.load(demo_model_dir("seg"), task="segmentation", device=str(self.device), fold_bn=False)
        nets = cycled(trained.members, MEMBERS)
        states = [{k: v.detach().clone() for k, v in net.state_dict().items()} for net in nets]
        network = copy.deepcopy(nets[0])
        self.predictors = {
            mirror: _nnunet_predictor(network, states, tile_px=self.tile_px, mirror=mirror, device=self.device)
            for mirror in (False, True)
        }
        # nnU-Net autocasts on CUDA only; on the CPU both sides run fp32 so that the predictors are
        # compared, and our bf16 autocast gets a row of its own.
        same = "auto" if self.device.type == "cuda" else "fp32"
        self.configs = {
            (overlap, precision): SegmentConfig(
                batch_size=8, read_workers=2, overlap_fraction=overlap, map_downsample=1, precision=precision
            )
            for overlap in (0.25, 0.5)
            for precision in (same, "auto")
        }
        self.same_precision = same
        self.auto_precision = Precision.choose("auto", self.ensemble.device)
        self.reference = self._ours_prob((0.5, same)) >= 0.5
        self.agreement: dict[str, str] = {}

    @property
    def mpx(self) -> float:
        return self.rgb.shape[0] * self.rgb.shape[1] / 1e6

    def _ours_prob(self, key: tuple[float, str]) -> np.ndarray:
        maps = segment_slide(self.region, self.ensemble, config=self.configs[key])
        h, w = self.rgb.shape[:2]
        return np.asarray(maps.prob)[:h, :w]

    def _ours(self, key: tuple[float, str], label: str) -> float:
        prob = self._ours_prob(key)
        self.agreement[label] = f"{((prob >= 0.5) == self.reference).mean():.4f}"
        return self.mpx

    def _nnunet(self, mirror: bool, label: str) -> float:
        predictor = self.predictors[mirror]
        logits = predictor.predict_logits_from_preprocessed_data(self.nnunet_input)  # (2, 1, H, W), mean logits
        positive = (logits[1, 0] > logits[0, 0]).numpy()
        self.agreement[label] = f"{(positive == self.reference).mean():.4f}"
        return self.mpx

    def cases(self) -> list[Case]:
        base = "nnU-Net v2 predictor, step 0.5, no mirroring"
        mirrored = "nnU-Net v2 predictor, step 0.5, mirroring (its default)"
        same = self.same_precision
        ours_half = f"ours, overlap 0.5, {same}"
        ours = f"ours, overlap 0.25 (default), {same}"
        cases = [
            Case(base, lambda: self._nnunet(False, base), baseline=True),
            Case(mirrored, lambda: self._nnunet(True, mirrored)),
            Case(ours_half, lambda: self._ours((0.5, same), ours_half)),
            Case(ours, lambda: self._ours((0.25, same), ours)),
        ]
        if same == "fp32" and self.auto_precision.autocast_dtype is not None:
            auto = "ours, overlap 0.25 (default), bf16 autocast"
            cases.append(Case(auto, lambda: self._ours((0.25, "auto"), auto)))
        return cases

    def extra(self, label: str) -> dict[str, str]:
        return {"same class as ours": self.agreement.get(label, "")}

    def conditions(self) -> dict[str, str]:
        m = self.ensemble.manifest
        from importlib.metadata import version

        return {
            "device": str(self.device),
            "precision": "autocast on CUDA (both)" if self.device.type == "cuda" else "fp32 unless the row says",
            "torch threads": str(torch.get_num_threads()),
            "region": f"{self.rgb.shape[1]}x{self.rgb.shape[0]} px at {m.input_mpp} µm/px (all of it, no tissue skip)",
            "members": f"{MEMBERS} x {m.architecture} {m.architecture_kwargs['features']}",
            "tiles": f"{self.tile_px} px, our batch 8, nnU-Net batch 1",
            "nnunetv2": version("nnunetv2"),
            "outputs": "ours: mean softmax + 4 uncertainty maps; nnU-Net: mean logits",
        }

    def teardown(self) -> None:
        self.region.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
