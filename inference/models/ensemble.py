"""Load a model folder into torch modules and run its members on a batch of tiles."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model
from torch import nn

from inference.advice import SettingWords, library_setting
from inference.errors import ModelFileError
from inference.models.fusion import fold_batchnorm
from inference.models.manifest import Manifest, Member, read_manifest
from inference.models.nnunet_network import is_nnunet_architecture
from inference.models.unet import KNOWN_ARCHITECTURES, build_model

log = logging.getLogger(__name__)


def _weights_error(err: Exception) -> str:
    """What a failed load says, its first concrete complaint included (torch puts it under a header line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") else "; ".join(lines[:2])


def _state_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers, names and shapes included (a key for its converted copy)."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        h.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _has_forward_hooks(member) -> bool:
    """True when a hook listens to the forward pass of ``member`` or of one of its layers (a torch module)."""
    if not isinstance(member, nn.Module):
        return False
    return any(m._forward_hooks or m._forward_pre_hooks for m in member.modules())


def demo_model_dir(kind: str) -> Path:
    """Folder of a shipped demo model: ``kind`` is ``"seg"``, ``"nuclei"`` (H&E) or ``"nuclei-ihc"`` (PD-L1 IHC)."""
    return Path(str(resources.files("inference") / "demo_models" / kind))


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks the first CUDA GPU when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} asked for, but torch sees no CUDA GPU; use 'cpu' (or 'auto', which takes a GPU where "
            "there is one)"
        )
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


# A member of more values than this (256 MB of float32) is built only where its file holds as many.
_BUILT_BEFORE_COMPARED = 2**26


def _built(folder: Path, manifest: Manifest) -> nn.Module:
    """A member of ``manifest``'s architecture, its weights as initialised (on the default device, the meta device
    where the caller sets it); :class:`ModelFileError` naming the manifest where it cannot be built."""
    try:
        return build_model(manifest.architecture, manifest.architecture_kwargs)
    except (KeyError, TypeError) as err:
        raise ModelFileError(
            f"{folder / 'manifest.json'}: architecture {manifest.architecture!r} with "
            f"{manifest.architecture_kwargs} cannot be built ({err}); this pdl1-bridge builds "
            f"{', '.join(KNOWN_ARCHITECTURES)} and nnU-Net v2 networks (the nnunet extra): is the model "
            "from a newer pdl1-bridge?"
        ) from err


def _values_to_build(folder: Path, manifest: Manifest) -> int:
    """How many values a member of ``manifest``'s architecture holds (parameters and buffers, each shared one once),
    counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = _built(folder, manifest)
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def _values_in_file(path: Path) -> int | None:
    """How many values a safetensors file holds, from its header alone; None where it does not read (the load
    names what is wrong with it)."""
    try:
        with safe_open(path, framework="pt") as fh:
            return sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())  # noqa: SIM118 - no __iter__
    except (SafetensorError, OSError):
        return None


class Ensemble:
    """The members of a model folder, loaded once, in eval mode on one device.

    ``members`` are torch modules, or, in the ensemble :meth:`on_runtime` returns for OpenVINO, callables
    taking and returning torch tensors as the modules do (``runtime`` says which). ``bn_folded`` says
    whether :meth:`load` folded the BatchNorms; ``member_files`` the manifest's entry of each member when
    they came from ``folder``'s files (their sha256 name the converted copies), None for members from memory.
    ``openvino_cache_dir`` is where :meth:`on_runtime` puts OpenVINO conversions that cannot go beside the
    model (a read-only model folder, members from memory); None: beside the model only. ``setting`` is how the
    user of whoever loaded it sets a run's settings, for the advice of :meth:`on_runtime`'s messages, met deep in
    a run (a conversion that fails: "run with runtime='torch'"; ``pdl1`` passes its options, ``--runtime torch``).
    """

    def __init__(
        self,
        manifest: Manifest,
        members: list[nn.Module],
        *,
        folder: Path,
        device: torch.device,
        bn_folded: bool = False,
        member_files: list[Member] | None = None,
        runtime: str = "torch",
        openvino_cache_dir: Path | None = None,
        setting: SettingWords = library_setting,
    ):
        self.manifest = manifest
        self.members = members
        self.folder = folder
        self.device = device
        self.bn_folded = bn_folded
        self.member_files = member_files
        self.runtime = runtime
        self.openvino_cache_dir = openvino_cache_dir
        self.setting = setting
        self._on_runtime: dict[tuple[str, bool, tuple[int, ...]], Ensemble] = {}
        self._lock = threading.Lock()
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
        cls,
        folder: str | Path,
        *,
        task: str,
        device: str | torch.device = "cpu",
        fold_bn: bool = True,
        openvino_cache_dir: Path | None = None,
        setting: SettingWords = library_setting,
    ) -> Ensemble:
        """Load and verify a model folder; ``fold_bn`` folds BatchNorms into their convolutions.

        Folding gives the same outputs to float32 rounding in less time (``benchmarks/README.md``);
        ``fold_bn=False`` keeps the members as trained. ``openvino_cache_dir``, ``setting``: see the class.
        """
        folder = Path(folder)
        manifest = read_manifest(folder, task=task, verify=True)
        dev = resolve_device(device) if isinstance(device, str) else device
        members = []
        n_folded = 0
        needs = _values_to_build(folder, manifest)
        for member in manifest.members:
            path = folder / member.file
            held = _values_in_file(path)
            if held is not None and needs > max(held, _BUILT_BEFORE_COMPARED):
                # Built first, a crafted manifest's widths asked for tens of GB before its weights were compared; a
                # smaller model is built and compared by torch, whose message names the first tensor that differs.
                raise ModelFileError(
                    f"{path}: weights do not fit {manifest.architecture} {manifest.architecture_kwargs}: the "
                    f"architecture holds {needs:,} values, the member file {held:,}; the manifest and its members "
                    "are from different models: copy the whole folder again, or retrain"
                )
            model = _built(folder, manifest)
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
        return cls(
            manifest,
            members,
            folder=folder,
            device=dev,
            bn_folded=fold_bn,
            member_files=list(manifest.members),
            openvino_cache_dir=openvino_cache_dir,
            setting=setting,
        )

    @classmethod
    def from_members(
        cls,
        manifest: Manifest,
        members: list[nn.Module],
        *,
        device: str = "cpu",
        openvino_cache_dir: Path | None = None,
    ) -> Ensemble:
        """Wrap in-memory modules (training, tests) without files; OpenVINO conversions of them go into
        ``openvino_cache_dir`` (none without it)."""
        dev = resolve_device(device)
        members = [m.to(dev).eval() for m in members]
        return cls(manifest, members, folder=Path("."), device=dev, openvino_cache_dir=openvino_cache_dir)

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
        return self._with(
            [self.members[index]], member_files=None if self.member_files is None else [self.member_files[index]]
        )

    def _with(self, members: list, **changes: Any) -> Ensemble:
        """An ensemble of ``members`` with this one's manifest, folder, device and the rest, but for ``changes``."""
        fields = {
            "folder": self.folder,
            "device": self.device,
            "bn_folded": self.bn_folded,
            "member_files": self.member_files,
            "runtime": self.runtime,
            "openvino_cache_dir": self.openvino_cache_dir,
            "setting": self.setting,
        }
        return Ensemble(self.manifest, members, **(fields | changes))

    def compile(self) -> Ensemble:
        """The same ensemble with ``torch.compile``d members (worth it on GPUs for long runs)."""
        if self.runtime != "torch":
            raise ValueError(f"torch.compile needs the torch members, not {self.runtime}'s")
        # Compiled modules are no longer the files' members: none names an OpenVINO conversion of them.
        return self._with([torch.compile(m) for m in self.members], member_files=None)

    def on_runtime(self, runtime: str, *, precision: Precision, compile_members: bool = False) -> Ensemble:
        """This ensemble with its members run by ``runtime`` (``auto``, ``torch`` or ``openvino``; see
        :func:`inference.models.openvino_engine.resolve_runtime`) in ``precision``.

        ``torch`` is this ensemble. ``openvino`` converts each member once (or reads it from the cache,
        :func:`~inference.models.openvino_engine.export_member`) and compiles it for the CPU in bf16
        inference precision where ``precision`` autocasts to bf16, else f32; the result is kept on this
        ensemble, so a service or a batch converts and compiles once per process. ``auto`` keeps members
        from memory (training, tests) on torch, their weights change too often to convert, and falls back to
        torch with a warning where the conversion fails; ``openvino`` raises then. ``compile_members``: the
        members will run through ``torch.compile``, so ``auto`` keeps them on torch and ``openvino`` is refused.
        """
        from inference.models import openvino_engine as ove

        if runtime == "auto" and self.member_files is None:
            runtime = "torch"
        chosen = ove.resolve_runtime(runtime, self.device, compile_members=compile_members, setting=self.setting)
        if chosen == self.runtime:
            return self
        if self.runtime != "torch":
            raise ValueError(f"an ensemble already on {self.runtime} cannot move to {chosen}")
        bf16 = precision.autocast_dtype == torch.bfloat16
        # OpenVINO runs no forward hooks: a member someone listens to (the domain guard's tile features on
        # member 0, inference.models.features) stays on torch, the others move.
        listened = tuple(i for i, m in enumerate(self.members) if _has_forward_hooks(m))
        with self._lock:
            done = self._on_runtime.get((chosen, bf16, listened))
            if done is None:
                try:
                    done = self._to_openvino(bf16=bf16, keep_on_torch=listened)
                except Exception as err:  # reported below, and only where the user left the choice to us
                    if runtime != "auto":
                        raise
                    # A network OpenVINO cannot convert (or convert faithfully) runs as it always did.
                    log.warning(
                        "runtime auto: %s %s stays on torch, OpenVINO failed on it: %s",
                        self.manifest.name,
                        self.manifest.version,
                        err,
                    )
                    done = self
                self._on_runtime[(chosen, bf16, listened)] = done
        return done

    def _to_openvino(self, *, bf16: bool, keep_on_torch: tuple[int, ...] = ()) -> Ensemble:
        from inference.models import openvino_engine as ove

        m = self.manifest
        started = time.perf_counter()
        roots = ove.cache_roots(
            None if self.member_files is None else self.folder, user_cache_dir=self.openvino_cache_dir
        )
        compiled, converted = [], 0
        for i, module in enumerate(self.members):
            if i in keep_on_torch:
                compiled.append(module)
                continue
            if self.member_files is not None:
                spec = self.member_files[i]
                name = f"{self.folder / spec.file} ({m.name} {m.version} member {i})"
                member_sha256 = spec.sha256
            else:
                # In memory (training, tests): no file names the weights, so the key is their own digest.
                name = f"{m.name} {m.version} member {i} (in memory)"
                member_sha256 = _state_digest(module)
            key = ove.cache_key(
                member_sha256=member_sha256,
                architecture=m.architecture,
                architecture_kwargs=m.architecture_kwargs,
                bn_folded=self.bn_folded,
                ov_version=ove.openvino_version(),
            )
            ir = ove.export_member(
                module, name=name, key=key, roots=roots, tile_px=m.tile_size_px, setting=self.setting
            )
            converted += ir.converted
            compiled.append(ove.compile_ir(ir.folder, bf16=bf16, name=name))
        log.info(
            "%s %s on OpenVINO %s (%s inference precision): %d of %d members converted, the rest from the "
            "cache; %d kept on torch for their forward hooks; %.1f s",
            m.name,
            m.version,
            ove.openvino_version(),
            "bf16" if bf16 else "f32",
            converted,
            len(self.members) - len(keep_on_torch),
            len(keep_on_torch),
            time.perf_counter() - started,
        )
        return self._with(compiled, runtime="openvino")

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
