"""Fold eval-mode BatchNorm layers into the convolution before them, for inference.

At inference a BatchNorm is a per-channel affine map with fixed statistics, so
``bn(conv(x)) == conv'(x)`` with ``w' = w * s`` and ``b' = (b - mean) * s + beta``, where
``s = gamma / sqrt(var + eps)``. Folding saves a read and a write of every activation after
each folded convolution; the outputs agree with the unfolded model to float32 rounding.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every ``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential``, in place.

    The BatchNorm is replaced by ``nn.Identity``, so the folded model no longer fits the
    original ``state_dict`` and must not be trained or saved. Only models in eval mode are
    folded (a training-mode BatchNorm normalises by the batch's own statistics), and each
    convolution must be used only where it stands (no weights shared with another layer).
    Returns the number of layers folded.
    """
    if any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        raise ValueError("fold_batchnorm needs a model in eval mode (call model.eval() first); it is for inference")
    folded = 0
    for seq in list(model.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for conv_name, bn_name in itertools.pairwise(names):
            conv, bn = seq._modules[conv_name], seq._modules[bn_name]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or bn.running_var is None:
                continue
            var = bn.running_var.double()
            gamma = bn.weight.double() if bn.affine else torch.ones_like(var)
            beta = bn.bias.double() if bn.affine else torch.zeros_like(var)
            scale = gamma / torch.sqrt(var + bn.eps)
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
            new_bias = (bias - bn.running_mean.double()) * scale + beta
            conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)
            seq._modules[bn_name] = nn.Identity()
            folded += 1
    return folded
