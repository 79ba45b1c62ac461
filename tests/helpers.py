"""Small models and slides for tests: pointwise ensembles make tiling maths checkable exactly."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference.analysis.tiling import TileGrid, block_region, grid_block_reader, tile_blocks, tile_grid
from inference.models.ensemble import Ensemble, demo_model_dir
from inference.models.manifest import Manifest, Member
from inference.phantom.pyramid import write_phantom
from inference.phantom.scene import PhantomSpec
from inference.slides.reader import ArrayReader
from inference.slides.slide import Mpp, Slide

#: A training schedule small enough for tests: 2 cycles of 2 epochs of 2 batches of 2 patches of 32 px, and the
#: same as `pdl1 train` options.
TINY_TRAINING = dict(cycles=2, epochs_per_cycle=2, iterations_per_epoch=2, batch_size=2, patch_px=32, tile_size_px=64)
TINY_TRAINING_ARGS = ["--cycles", "2", "--epochs-per-cycle", "2", "--iterations", "2", "--batch-size", "2"]
TINY_TRAINING_ARGS += ["--patch-px", "32"]


def small_phantoms(folder: Path, cases: list[tuple[int, float, float]]) -> list[Path]:
    """A 1536² H&E phantom ``folder/s<seed>.svs`` for each (seed, TPS %, stain shift) of ``cases``, in their order."""
    paths = []
    for seed, tps, shift in cases:
        path = folder / f"s{seed}.svs"
        write_phantom(path, PhantomSpec(1536, 1536, seed=seed, tps_percent=tps, shift=shift))
        paths.append(path)
    return paths


def two_ranked_phantoms(folder: Path) -> list[Path]:
    """Two small H&E phantoms a report and a review queue rank apart: TPS 60 unshifted, TPS 20 at shift 0.6."""
    return small_phantoms(folder, [(41, 60, 0.0), (42, 20, 0.6)])


def finetune_config(slide: str, init_model: str, out, **changes):
    """The fine-tuning tests' run (anchor, distillation): the tiny schedule from ``init_model`` on ``slide``, SGD
    at a rate that moves the weights measurably."""
    from inference.training.train_seg import SegTrainConfig

    common = dict(features=(4, 8), seed=3, init_model=init_model, optimizer="sgd", lr_max=0.05, lr_min=0.01)
    return SegTrainConfig(slides=(slide,), out_dir=str(out), **TINY_TRAINING, **{**common, **changes})


class PointwiseNet(nn.Module):
    """1x1 convolution RGB -> 2 logits: translation-equivariant, so tiling must not matter."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.as_tensor(weight, dtype=torch.float32).view(2, 3, 1, 1))
            self.conv.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def probs_np(self, rgb: np.ndarray, manifest: Manifest) -> np.ndarray:
        x = (rgb.astype(np.float64) / 255 - manifest.normalization["mean"]) / manifest.normalization["std"]
        w = self.conv.weight.detach().numpy().reshape(2, 3).astype(np.float64)
        logits = x @ w.T + self.conv.bias.detach().numpy()
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return np.moveaxis(e / e.sum(-1, keepdims=True), -1, 0)  # (2, H, W)


def pointwise_members(n: int, *, seed: int = 0, identical: bool = False) -> list[PointwiseNet]:
    rng = np.random.default_rng(seed)
    base_w, base_b = rng.normal(0, 1, (2, 3)), rng.normal(0, 0.5, 2)
    out = []
    for _ in range(n):
        if identical:
            out.append(PointwiseNet(base_w, base_b))
        else:
            out.append(PointwiseNet(base_w + rng.normal(0, 0.7, (2, 3)), base_b + rng.normal(0, 0.3, 2)))
    return out


def make_manifest(*, tile_size_px: int = 64, input_mpp: float = 1.0, n_members: int = 1) -> Manifest:
    return Manifest(
        name="test",
        version="0",
        task="segmentation",
        architecture="Pointwise",
        architecture_kwargs={},
        input_mpp=input_mpp,
        tile_size_px=tile_size_px,
        normalization={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        class_names=["background", "PD-L1 positive"],
        members=[Member(f"m{i}.safetensors", "0" * 64, 0, i, 0.0) for i in range(n_members)],
        thresholds={"segmentation": 0.5},
    )


def pointwise_ensemble(
    n: int, *, tile_size_px: int = 64, input_mpp: float = 1.0, identical: bool = False, seed: int = 0
) -> Ensemble:
    members = pointwise_members(n, seed=seed, identical=identical)
    manifest = make_manifest(tile_size_px=tile_size_px, input_mpp=input_mpp, n_members=n)
    return Ensemble.from_members(manifest, members, device="cpu")


def demo_seg_ensemble(*, device: str = "cpu", **manifest_changes) -> Ensemble:
    """The shipped demo segmentation ensemble, with ``manifest_changes`` (tile size, µm/px) applied."""
    ens = Ensemble.load(demo_model_dir("seg"), task="segmentation", device=device)
    manifest = dataclasses.replace(ens.manifest, **manifest_changes)
    return Ensemble(manifest, ens.members, folder=ens.folder, device=ens.device)


def random_slide(width: int, height: int, *, mpp: float = 1.0, seed: int = 0) -> Slide:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Slide(ArrayReader(rgb), mpp=Mpp(mpp, mpp, "test"))


def whole_image_grid(slide: Slide, *, mpp: float, tile_px: int = 256) -> TileGrid:
    """Tiles over the whole image at ``mpp``, overlapping by 64 px, the last ones hanging over its right and bottom."""
    return tile_grid(
        image_size_wh=slide.dimensions, tile_size_px=tile_px, overlap_px=64, downsample=mpp / slide.mpp.mean
    )


def assert_device_blocks_match_cpu(
    slide: Slide,
    *,
    mpp: float,
    box_factor: int,
    device: torch.device,
    decode=None,
    max_diff: int = 0,
    tile_px: int = 256,
    block_tiles: int = 3,
) -> int:
    """Every block of :class:`DeviceBlockReader` against the CPU reader's; returns how many blocks.

    ``max_diff`` is the largest grey-level difference allowed (0: the same pixels); the mean
    difference must stay under 0.5 either way.
    """
    from inference.slides.gpu_decode import DeviceBlockReader

    grid = whole_image_grid(slide, mpp=mpp, tile_px=tile_px)
    cpu = grid_block_reader(slide, grid, mpp=mpp, box_factor=box_factor)
    regions = partial(block_region, grid, box_factor=box_factor)
    reader = DeviceBlockReader(slide, regions, mpp=mpp, box_factor=box_factor, device=device, decode=decode)
    blocks = tile_blocks(grid, block_tiles=block_tiles)
    for indices in blocks:
        for ours, theirs in zip(reader(indices), cpu(indices), strict=True):
            assert isinstance(ours, torch.Tensor) and ours.dtype == torch.uint8 and ours.device.type == device.type
            assert tuple(ours.shape) == theirs.shape
            diff = np.abs(ours.cpu().numpy().astype(np.int16) - theirs)
            assert diff.max() <= max_diff and diff.mean() < 0.5, (diff.max(), diff.mean())
    return len(blocks)


class JavaPathObject:
    """What bridge.qupath calls of a Java PathObject, as QuPath 0.4.4 to 0.6 behave (PathObject.java); ``label``
    names it in a test's expectations. Kind "TMA core" is a TMACoreObject: no annotation, no detection."""

    def __init__(self, kind, geometry, cls=None, name=None, measurements=None, kids=(), *, label=None, missing=False):
        self.kind, self.geometry, self.name, self.measurements = kind, geometry, name, dict(measurements or {})
        self.missing = missing  # a TMA core's (kind "TMA core") missing flag
        self.cls = None if cls is None else type("PathClass", (), {"toString": lambda _self: cls})()
        self.label, self.parent, self.kids = label, None, []
        self.addChildObjects(kids)

    def addChildObjects(self, objects):  # noqa: N802 - takes each from its old parent first
        for obj in list(objects):
            if obj.parent is not None:
                obj.parent.kids.remove(obj)
            obj.parent = self
            self.kids.append(obj)

    def getChildObjectsAsArray(self):  # noqa: N802
        return list(self.kids)

    def getParent(self):  # noqa: N802
        return self.parent

    def getPathClass(self):  # noqa: N802
        return self.cls

    def getName(self):  # noqa: N802
        return self.name

    def isTile(self):  # noqa: N802
        return self.kind == "tile"

    def isAnnotation(self):  # noqa: N802
        return self.kind == "annotation"

    def isDetection(self):  # noqa: N802
        return self.kind in ("detection", "tile")

    def isTMACore(self):  # noqa: N802
        return self.kind == "TMA core"

    def isMissing(self):  # noqa: N802 - TMACoreObject only
        return self.missing


def paquo_stand_ins(monkeypatch, remove_objects):
    """bridge.qupath on :class:`JavaPathObject` trees without a JVM: paquo.java's ArrayList, and paquo's object
    wrapper without a hierarchy behind it. Returns (the wrapper class, an entry whose hierarchy's Java
    ``removeObjects(objects, keepChildren)`` is ``remove_objects``)."""
    import sys
    from contextlib import contextmanager
    from types import ModuleType, SimpleNamespace

    from bridge import qupath

    class ArrayList(list):
        add = list.append

    java = ModuleType("paquo.java")
    java.ArrayList = ArrayList
    monkeypatch.setitem(sys.modules, "paquo.java", java)

    class Wrapper:
        def __init__(self, obj):
            self.java_object, self.measurements, self.roi = obj, obj.measurements, obj.geometry

    monkeypatch.setattr(qupath, "_paquo", lambda: {"annotation": Wrapper, "QuPathPathClass": lambda *a, **k: None})

    class Hierarchy:
        java_object = SimpleNamespace(removeObjects=remove_objects)

        @contextmanager
        def no_autoflush(self):
            yield self

    return Wrapper, SimpleNamespace(hierarchy=Hierarchy())


def exported_labelled_project(labelled: Path, tmp_path: Path) -> Path:
    """The labelled fixture project, its image beside it, with the pathologist's labels exported for entry 1 (as
    pdl1_export_labels.groovy writes them); the project's folder."""
    import shutil

    from bridge.labels import export_path

    project = tmp_path / "project"
    shutil.copytree(labelled / "project", project)
    (tmp_path / "he-1357.svs").symlink_to(labelled / "he-1357.svs")
    exported = export_path(project, "1")
    exported.parent.mkdir(parents=True)
    exported.write_text((labelled / "objects-labelled-by-pathologist-0.4.4.geojson").read_text())
    return project
