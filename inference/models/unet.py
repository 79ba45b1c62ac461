"""A 2D U-Net shaped like nnU-Net's PlainConvUNet, in plain torch.

Each stage is ``n_conv`` x (conv 3x3 -> norm -> LeakyReLU); the first conv of every
stage after the first has stride 2 (no pooling); the decoder upsamples with transposed
convolutions, concatenates the skip, and runs the same conv blocks. RGB in, ``n_classes``
logits out at the input resolution.

Norm: nnU-Net uses InstanceNorm, which normalises every input by its own statistics. On a
whole slide cut into tiles that makes a tile's prediction depend on what else is in the tile
(a tile of glass and tissue is normalised differently from one of tissue only), and seams
show. The default here is BatchNorm, whose running statistics make inference
translation-equivariant, so tiling does not change the maps; ``norm="instance"`` is kept.
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = {
    "batch": lambda ch: nn.BatchNorm2d(ch, eps=1e-5),
    "instance": lambda ch: nn.InstanceNorm2d(ch, affine=True, eps=1e-5),
}


class ConvBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, *, n_conv: int, first_stride: int, norm: str = "batch"):
        layers: list[nn.Module] = []
        for i in range(n_conv):
            layers += [
                nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, stride=first_stride if i == 0 else 1, padding=1),
                NORMS[norm](out_ch),
                nn.LeakyReLU(0.01, inplace=True),
            ]
        super().__init__(*layers)


class PlainConvUNet(nn.Module):
    """U-Net with ``len(features)`` stages; the input edge must be divisible by ``2 ** (stages - 1)``."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        n_classes: int = 2,
        features: tuple[int, ...] = (16, 32, 64, 128),
        n_conv_per_stage: int = 2,
        norm: str = "batch",
    ):
        super().__init__()
        if len(features) < 2:
            raise ValueError(f"a U-Net needs at least 2 stages, got features={features}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        self.features = tuple(features)
        self.encoder = nn.ModuleList()
        ch = in_channels
        for i, f in enumerate(features):
            self.encoder.append(ConvBlock(ch, f, n_conv=n_conv_per_stage, first_stride=1 if i == 0 else 2, norm=norm))
            ch = f
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for f_skip in reversed(features[:-1]):
            self.up.append(nn.ConvTranspose2d(ch, f_skip, 2, stride=2))
            self.decoder.append(ConvBlock(2 * f_skip, f_skip, n_conv=n_conv_per_stage, first_stride=1, norm=norm))
            ch = f_skip
        self.head = nn.Conv2d(ch, n_classes, 1)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.features) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


# The architectures build_model knows by name (besides nnU-Net v2's class paths).
KNOWN_ARCHITECTURES = ("PlainConvUNet", "DilatedResFCN")


def build_model(architecture: str, kwargs: dict) -> nn.Module:
    """Instantiate a registered architecture by name; unknown names raise ``KeyError``.

    nnU-Net v2 networks (class paths ``dynamic_network_architectures....``) are built by
    :func:`inference.models.nnunet_network.build_nnunet_network`.
    """
    from inference.models.nnunet_network import build_nnunet_network, is_nnunet_architecture
    from inference.models.nuclei_model import DilatedResFCN

    if is_nnunet_architecture(architecture):
        return build_nnunet_network(architecture, kwargs)

    architectures: dict[str, type[nn.Module]] = {"PlainConvUNet": PlainConvUNet, "DilatedResFCN": DilatedResFCN}
    cls = architectures[architecture]
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
