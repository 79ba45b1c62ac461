"""Run an ensemble's members through OpenVINO on the CPU: converted once, checked against PyTorch, cached.

Which runtime runs the members is a config setting (``SegmentConfig.runtime``, ``NucleiConfig.runtime``):
``torch`` (eager PyTorch, as trained), ``openvino`` (this module; the ``openvino`` extra) or ``auto``
(:data:`AUTO_CPU_RUNTIME` on the CPU when OpenVINO is installed, else torch; always torch on CUDA).
:func:`resolve_runtime` decides it once per call.

A member is converted with ``openvino.convert_model`` from the module as loaded (eval mode, BatchNorms
folded where the ensemble folded them), with a dynamic batch and tile size, and saved as OpenVINO IR
(``.xml`` + ``.bin``, float32 weights) in a folder named by :func:`cache_key`: the member's sha256 (from
the manifest), its architecture, whether BatchNorms were folded, and the OpenVINO version. The folder goes
beside the model (``<model>/.openvino/``) when the model folder is writable, else under the user cache folder
the caller passes (:func:`cache_roots`; the CLI and the service pass ``$XDG_CACHE_HOME/pdl1-bridge/openvino``).
It is written under a temporary name and renamed into place, with a
``meta.json`` holding the sha256 of both IR files; a later load checks them and converts again (with a
log line) when they do not match. A fresh conversion is compiled in f32 and run on a fixed input against
the PyTorch member: more than :data:`EXPORT_TOLERANCE` apart is an :class:`~inference.errors.EngineExportError`.

Compiled members are callables taking and returning torch tensors, like the modules they stand for, so
the sliding windows call them unchanged; bf16 autocast becomes OpenVINO's bf16 inference precision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference.advice import SettingWords, library_setting
from inference.errors import EngineExportError, RuntimeUnavailableError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino")
# What runtime="auto" runs on the CPU when OpenVINO is installed (on CUDA always torch). Chosen by measuring a
# whole `pdl1 run` of an 8192² phantom both ways (benchmarks/README.md, `runtimes`, 2026-12-05): on a quiet
# CPU OpenVINO was 0.93x torch, so torch; it was 1.4-4.9x faster only while other jobs loaded the 2 CPUs
# (eager PyTorch's thread pool degrades there, OpenVINO's much less): opt in for such machines.
AUTO_CPU_RUNTIME = "torch"
INSTALL_HINT = "pip install 'pdl1-bridge[openvino]'"
# Largest |OpenVINO f32 - PyTorch fp32| allowed on the check input of a fresh conversion.
EXPORT_TOLERANCE = 1e-4
# Bumped when what is written to the cache changes (so older folders are not read as current).
CACHE_FORMAT = 1
CACHE_FOLDER = ".openvino"
_META = "meta.json"
_XML, _BIN = "model.xml", "model.bin"


def openvino_available() -> bool:
    """True when the ``openvino`` package can be imported (the ``openvino`` extra)."""
    return find_spec("openvino") is not None


def validate_runtime(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one of :data:`RUNTIMES`."""
    if name not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {name!r}")


def resolve_runtime(
    name: str, device: torch.device, *, compile_members: bool = False, setting: SettingWords = library_setting
) -> str:
    """The runtime that runs the members: ``"torch"`` or ``"openvino"``.

    ``openvino`` is CPU only: asked for on CUDA it is refused, and ``auto`` is torch there. ``auto`` on
    the CPU is :data:`AUTO_CPU_RUNTIME` when OpenVINO is installed (and ``torch.compile`` was not asked
    for), else torch. ``openvino`` without the package raises :class:`RuntimeUnavailableError`. The messages
    advise the settings in the caller's user's words (``setting``; :func:`library_setting` by default).

    >>> resolve_runtime("torch", torch.device("cpu"))
    'torch'
    >>> resolve_runtime("auto", torch.device("cuda"))
    'torch'
    """
    validate_runtime(name)
    if name == "torch":
        return "torch"
    if name == "auto":
        if device.type != "cpu" or compile_members or not openvino_available():
            return "torch"
        return AUTO_CPU_RUNTIME
    if device.type != "cpu":
        raise ValueError(
            f"runtime 'openvino' runs the members on the CPU, but the device is {device}; use "
            f"{setting('runtime', 'torch')} (or {setting('runtime', 'auto')}) on a GPU, or {setting('device', 'cpu')}"
        )
    if compile_members:
        raise ValueError(
            f"torch.compile ({setting('compile', True)}) and runtime 'openvino' exclude each other; give one"
        )
    if not openvino_available():
        raise RuntimeUnavailableError(
            f"runtime 'openvino' asked for, but OpenVINO is not installed: {INSTALL_HINT}, or use "
            f"{setting('runtime', 'torch')}"
        )
    return "openvino"


def check_runtime(
    runtime: str, device: str, *, compile_members: bool = False, setting: SettingWords = library_setting
) -> str:
    """:func:`resolve_runtime` for a device named as the configs name it (``auto``, ``cpu``, ``cuda:N``): the
    runtime a run will use, or the error it would meet, before any image is read; its messages advise the
    settings in ``setting``'s words."""
    validate_runtime(runtime)
    if runtime == "torch":
        return "torch"
    # The device's kind only: whether it is there is the run's to find out, as without this check.
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    return resolve_runtime(runtime, dev, compile_members=compile_members, setting=setting)


def cache_key(
    *, member_sha256: str, architecture: str, architecture_kwargs: dict, bn_folded: bool, ov_version: str
) -> str:
    """Name of a converted member's cache folder: the same for the same weights, network, folding and OpenVINO.

    >>> k = cache_key(member_sha256="ab" * 32, architecture="PlainConvUNet", architecture_kwargs={"features": [8]},
    ...               bn_folded=True, ov_version="2026.4.1")
    >>> k.startswith("abababababab-") and len(k) == 13 + 16
    True
    >>> k == cache_key(member_sha256="ab" * 32, architecture="PlainConvUNet", architecture_kwargs={"features": [8]},
    ...                bn_folded=False, ov_version="2026.4.1")
    False
    """
    payload = json.dumps(
        {
            "format": CACHE_FORMAT,
            "member_sha256": member_sha256,
            "architecture": architecture,
            "kwargs": architecture_kwargs,
            "bn_folded": bn_folded,
            "openvino": ov_version,
        },
        sort_keys=True,
    )
    return f"{member_sha256[:12]}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_ir_problem(folder: Path) -> str | None:
    """Why the IR in ``folder`` cannot be used (missing files, checksums that do not match), or None when it can."""
    meta_path = folder / _META
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta["sha256"]
    except FileNotFoundError:
        return f"{meta_path} is missing"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{meta_path} is unreadable ({err})"
    for name in (_XML, _BIN):
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if file_sha256(path) != expected.get(name):
            return f"{path} does not match the sha256 recorded in {_META}"
    return None


def cache_roots(model_folder: Path | None, *, user_cache_dir: Path | None) -> list[Path]:
    """Where to look for and write converted members, in order: beside the model (None: members from memory),
    then ``user_cache_dir`` (None: nowhere else).

    >>> [p.as_posix() for p in cache_roots(Path("models/seg"), user_cache_dir=Path("cache"))]
    ['models/seg/.openvino', 'cache']
    >>> cache_roots(None, user_cache_dir=None)
    []
    """
    roots = [] if model_folder is None else [model_folder / CACHE_FOLDER]
    return roots if user_cache_dir is None else [*roots, user_cache_dir]


@dataclass(frozen=True)
class ConvertedMember:
    """Where a member's IR lies and whether this call converted it (False: read from the cache)."""

    folder: Path
    converted: bool
    seconds: float


def _check_input(tile_px: int) -> torch.Tensor:
    """The fixed input a fresh conversion is checked on: 2 tiles of seeded normal noise (normalised pixels)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(2, 3, tile_px, tile_px, generator=gen)


def export_member(
    module: nn.Module,
    *,
    name: str,
    key: str,
    roots: list[Path],
    tile_px: int,
    in_channels: int = 3,
    setting: SettingWords = library_setting,
) -> ConvertedMember:
    """The IR of ``module``: from the first root holding a valid copy under ``key``, else converted, checked
    against ``module`` within :data:`EXPORT_TOLERANCE` and written atomically into the first writable root.
    The messages of a conversion refused advise the runtime in ``setting``'s words."""
    import openvino as ov

    started = time.perf_counter()
    for root in roots:
        folder = root / key
        if not folder.exists():
            continue
        problem = cached_ir_problem(folder)
        if problem is None:
            return ConvertedMember(folder, False, time.perf_counter() - started)
        log.warning("cached OpenVINO member %s is not usable (%s): converting it again", name, problem)
        shutil.rmtree(folder, ignore_errors=True)

    # OpenVINO traces the module with torch.jit.trace, whose deprecation warnings say nothing to a user.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = ov.convert_model(
            module,
            example_input=torch.zeros(1, in_channels, tile_px, tile_px),
            input=[ov.PartialShape([-1, in_channels, -1, -1])],
        )
    problems = []
    for root in roots:
        try:
            final, diff = _write_checked(model, module, root=root, key=key, name=name, tile_px=tile_px,
                                         in_channels=in_channels, setting=setting)  # fmt: skip
        except OSError as err:
            problems.append(f"{root}: {err.strerror or err}")
            continue
        seconds = time.perf_counter() - started
        log.info(
            "converted %s to OpenVINO in %.1f s (max |diff| %.2g in f32), cached in %s", name, seconds, diff, final
        )
        return ConvertedMember(final, True, seconds)
    if not roots:
        problems.append("the members come from memory and no user cache folder was given")
    raise OSError(
        f"{name}: no writable folder for its OpenVINO conversion ({'; '.join(problems)}); make the model folder "
        "writable, give a writable user cache folder (PipelineConfig.openvino_cache_dir; pdl1 uses "
        f"$XDG_CACHE_HOME/pdl1-bridge/openvino), or run with {setting('runtime', 'torch')}"
    )


def _write_checked(
    model, module: nn.Module, *, root: Path, key: str, name: str, tile_px: int, in_channels: int, setting: SettingWords
):
    """Save ``model`` under ``root / key`` (a temporary folder renamed into place) once it passes the check."""
    import openvino as ov

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.", suffix=".part"))
    try:
        # compress_to_fp16=False: the IR keeps the float32 weights the check below holds it to.
        ov.save_model(model, tmp / _XML, compress_to_fp16=False)
        diff = _max_difference(module, tmp, tile_px=tile_px, in_channels=in_channels)
        if not diff <= EXPORT_TOLERANCE:
            raise EngineExportError(
                f"{name}: OpenVINO's conversion differs from the PyTorch member by {diff:.3g} (max |difference| "
                f"of the logits in f32 on the check input; at most {EXPORT_TOLERANCE:g} allowed): run with "
                f"{setting('runtime', 'torch')}"
            )
        meta = {
            "member": name,
            "key": key,
            "openvino": ov.get_version(),
            "max_abs_difference_f32": diff,
            "sha256": {n: file_sha256(tmp / n) for n in (_XML, _BIN)},
        }
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared model folder's cache from its other users
        final = root / key
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process put a copy there first: use it if it is whole, else replace it.
            if final.is_dir() and cached_ir_problem(final) is None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, diff


def _max_difference(module: nn.Module, ir_folder: Path, *, tile_px: int, in_channels: int) -> float:
    x = _check_input(tile_px)[:, :in_channels]
    with torch.inference_mode():
        expected = module(x).float().numpy()
    got = compile_ir(ir_folder, bf16=False)(x).numpy()
    if got.shape != expected.shape:
        return float("inf")
    return float(np.abs(got - expected).max())


# CPU plugin settings: one stream of as many threads as torch uses, so OpenVINO and PyTorch in one
# process share the cores rather than oversubscribe them.
def compile_properties(*, bf16: bool) -> dict:
    return {
        "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
    }


class OpenVinoMember:
    """A compiled member: ``member(x)`` takes a (B, C, H, W) float32 torch tensor and returns its logits as one."""

    def __init__(self, compiled, *, name: str = ""):
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()
        self.name = name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        feed = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        with self._lock:
            out = self._request.infer({0: feed})[0]
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))

    def __repr__(self) -> str:
        return f"OpenVinoMember({self.name!r})"


def compile_ir(folder: Path, *, bf16: bool, name: str = "") -> OpenVinoMember:
    """Compile the IR in ``folder`` for the CPU in f32 or bf16 inference precision."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(folder / _XML)
    return OpenVinoMember(core.compile_model(model, "CPU", compile_properties(bf16=bf16)), name=name)


def openvino_version() -> str:
    import openvino as ov

    return ov.get_version()
