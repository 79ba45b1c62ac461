"""Tile features for the domain guard: the mean and std of each channel of a member's feature layers, per tile.

Forward hooks on member 0's feature layers (:func:`feature_layers`) collect them while the sliding
window runs anyway (:func:`capture_tile_features`), so the guard costs a mean and a std per layer and
batch, not a second pass over the slide. Statistics computed on training slides and the scores of
analysed images both come through these hooks, so they are the same quantity.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from inference.models.ensemble import Ensemble


def feature_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose outputs describe a tile, shallow to deep, with their names: every encoder
    stage of a U-Net; the nuclei FCN's full-resolution stem, its stride-2 stage and its residual blocks.
    ``ValueError`` for other architectures."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd member wraps the module
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.ModuleList) and len(encoder):
        return [(f"encoder[{i}]", stage) for i, stage in enumerate(encoder)]
    if all(isinstance(getattr(model, n, None), nn.Module) for n in ("full", "down", "blocks")):
        return [(n, getattr(model, n)) for n in ("full", "down", "blocks")]
    raise ValueError(
        f"{type(model).__name__} has no known feature layers (a U-Net's encoder, the nuclei FCN's stem, "
        "down and blocks); the domain guard cannot use it"
    )


def channel_std_mean(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel of (B, C, H, W): the std (unbiased) and mean over the pixels, as
    ``torch.std_mean(a, dim=(2, 3))``.

    On channels-last activations (the members run so) torch reduces over H and W by a slow strided path:
    the nuclei FCN's full-resolution layers took 27 ms per batch of two 256² tiles and layer that way,
    6 ms through a (B, pixels, C) view (one thread; the same values within 2e-7 relative).
    """
    if a.dim() != 4 or a.is_contiguous() or not a.is_contiguous(memory_format=torch.channels_last):
        return torch.std_mean(a, dim=(2, 3))
    b, c = a.shape[:2]
    x = a.permute(0, 2, 3, 1).reshape(b, -1, c)  # a view: channels-last memory is (B, H, W, C)
    mean = x.mean(dim=1)
    var = (x - mean[:, None]).square_().sum(dim=1) / max(x.shape[1] - 1, 1)
    return var.sqrt_(), mean


class TileFeatures:
    """The features captured so far: per tile, each layer's channel means then channel stds, layer by layer."""

    def __init__(self, names: list[str]):
        self.layers = ", ".join(names)
        self._parts: list[list[torch.Tensor]] = [[] for _ in names]

    def add(self, layer: int, activations: torch.Tensor) -> None:
        # Kept on the device until asked for: no host copy (and no GPU sync) per batch.
        std, mean = channel_std_mean(activations.detach().float())
        self._parts[layer].append(torch.cat([mean, std], dim=1))

    def array(self) -> np.ndarray:
        """(N, D) float32; (0, 0) when nothing ran."""
        if not self._parts[0]:
            return np.zeros((0, 0), np.float32)
        return torch.cat([torch.cat(p) for p in self._parts], dim=1).cpu().numpy()


@contextmanager
def capture_tile_features(ensemble: Ensemble) -> Iterator[TileFeatures]:
    """Collect member 0's tile features (:class:`TileFeatures`) for every batch it runs inside the block."""
    layers = feature_layers(ensemble.members[0])
    captured = TileFeatures([name for name, _ in layers])
    handles = [
        module.register_forward_hook(lambda _m, _inp, out, i=i: captured.add(i, out))
        for i, (_, module) in enumerate(layers)
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
