"""BatchNorm statistics re-estimated on the images to be analysed (AdaBN: Li, Wang, Shi, Liu & Hou 2016).

A BatchNorm layer normalises with running statistics gathered while training: the training domain's.
Fine-tuning on a new domain's patches replaces them with that domain's, which the network then uses on every
slide (the forgetting the README measures under issue #33). AdaBN leaves the weights as they are and
re-estimates every BatchNorm's running mean and variance on the images about to be analysed.

:func:`reestimate_batchnorm` does it for one module: forward passes without gradients, BatchNorm in train
mode with ``momentum=None`` (torch's cumulative average: every batch counts the same), the rest of the
network in eval mode. The running variance so gathered is the mean of the batches' variances, as training's
exponential average of batch statistics is, so a model's own statistics and re-estimated ones mean the same.

Benchmark code (``python -m benchmarks.shift_finetune --batchnorm-stats model,slide,slide:0.25,...``), not a
product option. Measured on the README's weak-expression phantoms (issue #33, "Fine-tuning against
forgetting"): a slide's own statistics alone cost the demo 0.15 of Dice in the new domain on the validation
slides, 0.06 on unshifted held-out slides and 0.72 on a slide of 5 % TPS (0.924 -> 0.206). Mixed 1:3 with the
model's own (``weight`` 0.25, Schneider et al. 2020's prior) they raised the demo's held-out Dice in the new
domain by 0.021 for -0.004 on unshifted slides, but cost a TPS-2 slide of the demo's own domain 0.021, and
did not keep any fine-tuned model's unshifted loss within 0.01 (-0.019 and -0.012 for the best).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from inference.models.ensemble import Ensemble
from inference.models.fusion import fold_batchnorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` that keeps running statistics, in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace the running mean and variance of every BatchNorm of ``model`` by those of ``batches``, in place.

    Parameters
    ----------
    model : torch.nn.Module
        A model whose BatchNorms are not folded into the convolutions (``Ensemble.load(fold_bn=False)``).
        It is left in eval mode; its parameters do not change.
    batches : iterable of torch.Tensor
        Inputs as ``model`` takes them (normalised, on its device), (B, C, H, W) each. Every batch's
        statistics count the same (cumulative average); a batch of one tile is fine where the tile has
        more than one pixel per channel at every layer.

    Returns
    -------
    int
        The number of batches seen.

    Raises
    ------
    ValueError
        When ``model`` has no BatchNorm with running statistics (folded, or another norm), or no batch came.
        Then, and when a forward pass raises, the statistics are left as they were.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1)).eval()
    >>> _ = net[0].weight.data.fill_(1.0)
    >>> reestimate_batchnorm(net, [torch.full((1, 1, 2, 2), 3.0), torch.full((1, 1, 2, 2), 5.0)])
    2
    >>> net[1].running_mean.tolist(), net[1].running_var.tolist(), net.training
    ([4.0], [0.0], False)
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer with running statistics to re-estimate (folded into "
            "the convolutions, or another normalisation): load the model with fold_bn=False"
        )
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    done = False
    try:
        for x in batches:
            model(x)
            seen += 1
        done = seen > 0
    finally:
        for m, (mean, var, count, momentum) in zip(layers, saved, strict=True):
            m.momentum = momentum
            m.eval()
            if not done:  # an error, or nothing to estimate on: the statistics stay as they were
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
    if not done:
        raise ValueError("no batch to re-estimate the BatchNorm statistics on (no tiles: no tissue found?)")
    return seen


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of ``model``'s BatchNorms (``running_mean``, ``running_var`` and
    ``num_batches_tracked`` entries of its state dict), copied."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


class _Members(nn.Module):
    """Runs every member on the same input (so one pass over the tiles re-estimates them all)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> None:
        for member in self.members:
            member(x)


def member_copies(ensemble: Ensemble) -> list[nn.Module]:
    """Copies of an unfolded torch ensemble's members, as trained (BatchNorm layers and their statistics), to change
    (here and in :mod:`benchmarks.weight_interpolation`) without touching ``ensemble``."""
    if ensemble.bn_folded:
        raise ValueError(
            f"{ensemble.manifest.name} {ensemble.manifest.version}: its BatchNorms are folded into the convolutions, "
            "so its members are not as trained: load it with Ensemble.load(..., fold_bn=False)"
        )
    if ensemble.runtime != "torch" or not all(isinstance(m, nn.Module) for m in ensemble.members):
        raise ValueError(f"only torch members can be changed so, not {ensemble.runtime}'s")
    return [copy.deepcopy(member) for member in ensemble.members]


@contextmanager
def _hooks_muted(members: list[nn.Module]) -> Iterator[None]:
    """The members' forward hooks (copied with them: the domain guard's) silent inside, back afterwards."""
    saved = []
    for member in members:
        for m in member.modules():
            saved.append((m, dict(m._forward_hooks), dict(m._forward_pre_hooks)))
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
    try:
        yield
    finally:
        for m, hooks, pre_hooks in saved:
            m._forward_hooks.update(hooks)
            m._forward_pre_hooks.update(pre_hooks)


def wrap_members(ensemble: Ensemble, members: list[nn.Module], *, fold_bn: bool) -> Ensemble:
    """``ensemble`` with ``members`` (its :func:`member_copies`, changed) in eval mode, their BatchNorms folded for
    speed with ``fold_bn``."""
    for member in members:
        member.eval()
        if fold_bn:
            fold_batchnorm(member)
    return Ensemble(ensemble.manifest, members, folder=ensemble.folder, device=ensemble.device, bn_folded=fold_bn)


def adapt_batchnorm(
    ensemble: Ensemble,
    batches_uint8: Iterable[np.ndarray | torch.Tensor],
    *,
    box_factor: int = 1,
    fold_bn: bool = True,
    weight: float = 1.0,
) -> Ensemble:
    """A copy of ``ensemble`` whose members' BatchNorm statistics are re-estimated on ``batches_uint8``.

    ``batches_uint8`` are (B, H, W, 3) uint8 tiles as :meth:`Ensemble.member_probs` takes them (normalised
    here as the manifest says; ``box_factor`` as there), read once: every member sees each batch. ``ensemble``
    must be loaded unfolded (``fold_bn=False``) and on torch; it is left unchanged. The copy's BatchNorms are
    folded (``fold_bn``) for speed, so it cannot be re-estimated again; its members come from memory
    (``member_files`` None). Forward hooks on the members (the domain guard's tile features) come with the
    copies but hear only the copy's predictions, not the passes that estimate the statistics.

    ``weight`` in (0, 1] mixes: each running mean and variance becomes ``weight * new + (1 - weight) * own``
    (the member's own statistics as a prior, as Schneider et al. 2020 weigh the source statistics, so a few
    tiles of one kind move them less); 1 keeps the new ones alone.
    """
    if not 0 < weight <= 1:
        raise ValueError(f"weight must be in (0, 1] (1: the new statistics alone), got {weight!r}")
    members = member_copies(ensemble)
    own = [batchnorm_state(m) for m in members]

    def normalised() -> Iterator[torch.Tensor]:
        for batch in batches_uint8:
            tiles = torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch
            yield ensemble.normalize(tiles, box_factor=box_factor)

    with _hooks_muted(members):
        reestimate_batchnorm(_Members(members), normalised())
    if weight < 1:
        for member, prior in zip(members, own, strict=True):
            layers = batchnorm_layers(member)
            for layer_name, layer in member.named_modules():
                if any(layer is bn for bn in layers):
                    prefix = f"{layer_name}." if layer_name else ""
                    layer.running_mean.mul_(weight).add_((1 - weight) * prior[prefix + "running_mean"])
                    layer.running_var.mul_(weight).add_((1 - weight) * prior[prefix + "running_var"])
    return wrap_members(ensemble, members, fold_bn=fold_bn)


def with_batchnorm_state(ensemble: Ensemble, state: dict[str, torch.Tensor], *, fold_bn: bool = True) -> Ensemble:
    """A copy of ``ensemble`` whose every member has the BatchNorm statistics ``state`` (:func:`batchnorm_state`
    of a model of the same architecture), its weights its own; ``ensemble`` must be unfolded, as for
    :func:`adapt_batchnorm`."""
    members = member_copies(ensemble)
    for member in members:
        own = member.state_dict()
        missing = sorted(set(state) ^ set(batchnorm_state(member)))
        if missing:
            raise ValueError(f"the BatchNorm statistics given do not fit the members (differing: {missing[:5]})")
        own.update({k: v.to(own[k]) for k, v in state.items()})
        member.load_state_dict(own)
    return wrap_members(ensemble, members, fold_bn=fold_bn)
