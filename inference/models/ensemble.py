"""Load a model folder into torch modules and run its members on a batch of tiles."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model
from torch import nn

from inference.errors import ModelFileError
from inference.models.fusion import fold_batchnorm
from inference.models.manifest import Manifest, read_manifest
from inference.models.nnunet_network import is_nnunet_architecture
from inference.models.unet import KNOWN_ARCHITECTURES, build_model

log = logging.getLogger(__name__)


def _weights_error(err: Exception) -> str:
    """What a failed load says, its first concrete complaint included (torch puts it under a header line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") else "; ".join(lines[:2])


def demo_model_dir(kind: str) -> Path:
    """Folder of a shipped demo model: ``kind`` is ``"seg"``, ``"nuclei"`` (H&E) or ``"nuclei-ihc"`` (PD-L1 IHC)."""
    return Path(str(resources.files("inference") / "demo_models" / kind))


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks the first CUDA GPU when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    autocast_dtype: torch.dtype | None

    @classmethod
    def choose(cls, name: str, device: torch.device) -> Precision:
        if name == "fp32":
            return cls(None)
        if name == "bf16":
            return cls(torch.bfloat16)
        if name != "auto":
            raise ValueError(f"precision must be auto, fp32 or bf16, got {name!r}")
        if device.type == "cuda" or cpu_supports_bf16():
            return cls(torch.bfloat16)
        return cls(None)


class Ensemble:
    """The members of a model folder, loaded once, in eval mode on one device."""

    def __init__(self, manifest: Manifest, members: list[nn.Module], *, folder: Path, device: torch.device):
        self.manifest = manifest
        self.members = members
        self.folder = folder
        self.device = device
        norm = manifest.normalization
        self._mean = torch.tensor(norm["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(norm["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # Optional per-channel bounds on x / 255 before the affine map (nnU-Net's CTNormalization clips so).
        self._clip = (
            (
                torch.tensor(norm["clip_min"], dtype=torch.float32, device=device).view(1, 3, 1, 1),
                torch.tensor(norm["clip_max"], dtype=torch.float32, device=device).view(1, 3, 1, 1),
            )
            if "clip_min" in norm
            else None
        )

    @classmethod
    def load(
        cls, folder: str | Path, *, task: str, device: str | torch.device = "cpu", fold_bn: bool = True
    ) -> Ensemble:
        """Load and verify a model folder; ``fold_bn`` folds BatchNorms into their convolutions.

        Folding gives the same outputs to float32 rounding in less time (``benchmarks/README.md``);
        ``fold_bn=False`` keeps the members as trained.
        """
        folder = Path(folder)
        manifest = read_manifest(folder, task=task, verify=True)
        dev = resolve_device(device) if isinstance(device, str) else device
        members = []
        n_folded = 0
        for member in manifest.members:
            path = folder / member.file
            try:
                model = build_model(manifest.architecture, manifest.architecture_kwargs)
            except (KeyError, TypeError) as err:
                raise ModelFileError(
                    f"{folder / 'manifest.json'}: architecture {manifest.architecture!r} with "
                    f"{manifest.architecture_kwargs} cannot be built ({err}); this pdl1-bridge builds "
                    f"{', '.join(KNOWN_ARCHITECTURES)} and nnU-Net v2 networks (the nnunet extra): is the model "
                    "from a newer pdl1-bridge?"
                ) from err
            try:
                if is_nnunet_architecture(manifest.architecture):
                    # nnU-Net's conv blocks hold each convolution under two names; the file keeps one.
                    load_model(model, path, strict=True, device="cpu")
                else:
                    model.load_state_dict(load_file(path), strict=True)
            except (SafetensorError, RuntimeError, OSError) as err:
                raise ModelFileError(
                    f"{path}: weights do not fit {manifest.architecture} {manifest.architecture_kwargs}: "
                    f"{_weights_error(err)}; the manifest and its members are from different models: copy the "
                    "whole folder again, or retrain"
                ) from err
            model.eval()
            n_folded = fold_batchnorm(model) if fold_bn else 0
            members.append(model.to(dev))
        log.info(
            "loaded %s %s (%d members, %d BatchNorms folded each) on %s",
            manifest.name,
            manifest.version,
            len(members),
            n_folded,
            dev,
        )
        return cls(manifest, members, folder=folder, device=dev)

    @classmethod
    def from_members(cls, manifest: Manifest, members: list[nn.Module], *, device: str = "cpu") -> Ensemble:
        """Wrap in-memory modules (training, tests) without files."""
        dev = resolve_device(device)
        return cls(manifest, [m.to(dev).eval() for m in members], folder=Path("."), device=dev)

    def normalize(self, batch_uint8: torch.Tensor, *, box_factor: int = 1) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H / box_factor, W / box_factor) float32 normalised as the manifest says.

        ``(clip(x / 255, clip_min, clip_max) - mean) / std`` per channel; the clip only where the
        manifest's normalisation has ``clip_min`` and ``clip_max``.

        ``box_factor`` > 1 averages boxes of that many pixels per side on the device first (see
        ``SegmentConfig.reduce_on_device``). On CUDA the uint8 batch goes through pinned
        memory, so the copy is asynchronous and the next batch can be read while this one runs;
        a batch already on the device (decoded there) stays where it is.
        """
        if self.device.type == "cuda" and not batch_uint8.is_cuda and not batch_uint8.is_pinned():
            batch_uint8 = batch_uint8.pin_memory()
        x = batch_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if box_factor > 1:
            x = F.avg_pool2d(x, box_factor)
        x = x.div_(255.0)
        if self._clip is not None:
            x = torch.clamp(x, self._clip[0], self._clip[1])
        return (x - self._mean) / self._std

    def member(self, index: int) -> Ensemble:
        """Member ``index`` alone, as a one-member ensemble with the same manifest and normalisation.

        For per-member scores (validation, evaluation): the manifest still lists every member.
        """
        if not 0 <= index < len(self.members):
            raise IndexError(f"member {index} of an ensemble of {len(self.members)} (0 to {len(self.members) - 1})")
        return Ensemble(self.manifest, [self.members[index]], folder=self.folder, device=self.device)

    def compile(self) -> Ensemble:
        """The same ensemble with ``torch.compile``d members (worth it on GPUs for long runs)."""
        compiled = [torch.compile(m) for m in self.members]
        return Ensemble(self.manifest, compiled, folder=self.folder, device=self.device)

    @torch.inference_mode()
    def member_logits(
        self, batch_uint8: np.ndarray | torch.Tensor, *, precision: Precision, box_factor: int = 1
    ) -> torch.Tensor:
        """Logits of every member: (M, B, C, H, W) float32 on the device (H, W after ``box_factor``)."""
        batch = torch.from_numpy(batch_uint8) if isinstance(batch_uint8, np.ndarray) else batch_uint8
        x = self.normalize(batch, box_factor=box_factor)
        out = []
        for model in self.members:
            if precision.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=precision.autocast_dtype):
                    logits = model(x)
            else:
                logits = model(x)
            out.append(logits.float())
        return torch.stack(out)

    @torch.inference_mode()
    def member_probs(
        self, batch_uint8: np.ndarray | torch.Tensor, *, precision: Precision, box_factor: int = 1
    ) -> torch.Tensor:
        """Softmax of every member: (M, B, C, H, W) float32 on the device (H, W after ``box_factor``)."""
        return torch.softmax(self.member_logits(batch_uint8, precision=precision, box_factor=box_factor), dim=2)
