"""Point-supervised nuclei FCN: a dilated residual backbone, per-class heatmaps at output stride 1.

Input RGB at the model's MPP; output ``n_classes`` logits per pixel whose sigmoid is a
heatmap peaking (1.0) at nucleus centres of that class (``Tumor: Positive``,
``Tumor: Negative``, ``Other``). The backbone works at stride 2 with dilations that widen
the receptive field without losing resolution; a transposed convolution and a full-resolution
skip bring the heatmaps back to stride 1, so nuclei a few microns apart stay separate.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class DilatedResFCN(nn.Module):
    """FCN for point heatmaps; input edges must be even. ``output_stride`` is 1."""

    output_stride = 1

    def __init__(
        self, *, in_channels: int = 3, n_classes: int = 3, width: int = 32, dilations: tuple[int, ...] = (1, 2, 4, 8)
    ):
        super().__init__()
        self.full = nn.Sequential(
            nn.Conv2d(in_channels, width // 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(width // 2),
            nn.ReLU(inplace=True),
        )
        self.down = nn.Sequential(
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(*(ResidualBlock(width, d) for d in dilations))
        self.up = nn.ConvTranspose2d(width, width // 2, 2, stride=2)
        self.head = nn.Sequential(
            nn.Conv2d(width, width // 2, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width // 2, n_classes, 1)
        )
        # Heatmaps are mostly background: start the logits low (CenterNet's prior).
        nn.init.constant_(self.head[-1].bias, -2.19)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.full(x)
        y = self.up(self.blocks(self.down(skip)))
        return self.head(torch.cat([y, skip], dim=1))
