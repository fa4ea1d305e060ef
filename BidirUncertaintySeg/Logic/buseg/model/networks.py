"""Segmentation networks of the reference protocol: a 2D U-Net and a 3D V-Net.

MONAI's ``BasicUNet`` and ``VNet`` differ from the networks the published ACDC/LA results
use (MONAI's U-Net upsamples with transposed convolutions and has no per-level encoder
dropout; MONAI's V-Net uses 5x5x5 residual PReLU blocks), so both are written here, small
and faithful to the published architectures:

* :class:`UNet2D` - channels 16-32-64-128-256, BatchNorm, LeakyReLU, encoder dropout
  0.05/0.1/0.2/0.3/0.5, decoder of 1x1 conv + bilinear x2 upsampling + concatenation +
  conv block, 3x3 output convolution.
* :class:`VNet` - 16 base filters, plain conv stages (1-2-3-3-3), BatchNorm, ReLU, strided
  conv down / transposed conv up, additive skips, Dropout3d(0.5) at the bottleneck and
  before the output.

Both return logits of shape (N, classes, *spatial). Dropout is what MC-dropout samples;
:func:`set_dropout` switches it on while BatchNorm keeps its running statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

UNET_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class _ConvBlock2d(nn.Sequential):
    # LeakyReLU in place: it overwrites the BatchNorm output, which backward does not need
    # (BatchNorm keeps its input), so training holds one feature map less per activation;
    # the values are the same (docs/speed.md: peak RAM).
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(inplace=True),
        )


class _UpBlock2d(nn.Module):
    def __init__(self, low_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(low_channels, skip_channels, 1)
        self.conv = _ConvBlock2d(skip_channels * 2, out_channels, 0.0)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.reduce(low), size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, up], dim=1))


class UNet2D(nn.Module):
    """The 2D U-Net of the ACDC reference protocol (SSL4MIS/BCP)."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 4, base_channels: int = 16, dropout: bool = True
    ):
        super().__init__()
        ch = [base_channels * 2**i for i in range(5)]
        p = UNET_DROPOUT if dropout else (0.0,) * 5
        self.in_channels, self.num_classes = in_channels, num_classes
        self.enc0 = _ConvBlock2d(in_channels, ch[0], p[0])
        self.enc = nn.ModuleList(_ConvBlock2d(ch[i - 1], ch[i], p[i]) for i in range(1, 5))
        self.dec = nn.ModuleList(_UpBlock2d(ch[i], ch[i - 1], ch[i - 1]) for i in range(4, 0, -1))
        self.head = nn.Conv2d(ch[0], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.enc0(x)]
        for block in self.enc:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for block in self.dec:
            y = block(y, skips.pop())
        return self.head(y)


class Conv3dBf16Safe(nn.Conv3d):
    """A Conv3d that computes in float32 where the CPU's bfloat16 weight gradient is wrong.

    Measured with torch 2.13 (oneDNN) on the CPU: a 3x3x3 convolution of an input only 2 voxels
    deep gives a bfloat16 weight gradient off by orders of magnitude, sometimes inf (a NaN loss
    a few iterations later); depths 1 and 3 or more are right, as are 2D convolutions. A V-Net
    meets it at a patch depth of 16 (2 voxels at the fourth level). Such layers are tiny, so
    float32 there costs nothing measurable; the weights are the same parameters either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and 2 in x.shape[2:]:
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def _conv_stage3d(stages: int, in_channels: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(stages):
        layers += [
            Conv3dBf16Safe(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _down3d(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 2, stride=2), nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True)
    )


def _up3d(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


class VNet(nn.Module):
    """The 3D V-Net of the LA reference protocol (UA-MT/BCP)."""

    STAGES = (1, 2, 3, 3, 3)

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 16, dropout: bool = True
    ):
        super().__init__()
        ch = [base_channels * 2**i for i in range(5)]
        self.in_channels, self.num_classes = in_channels, num_classes
        self.enc = nn.ModuleList(
            _conv_stage3d(self.STAGES[i], in_channels if i == 0 else ch[i], ch[i]) for i in range(5)
        )
        self.down = nn.ModuleList(_down3d(ch[i], ch[i + 1]) for i in range(4))
        self.up = nn.ModuleList(_up3d(ch[i], ch[i - 1]) for i in range(4, 0, -1))
        self.dec = nn.ModuleList(_conv_stage3d(self.STAGES[i], ch[i], ch[i]) for i in range(3, -1, -1))
        self.dropout = nn.Dropout3d(0.5) if dropout else nn.Identity()
        self.head = nn.Conv3d(ch[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, stage in enumerate(self.enc):
            x = stage(x)
            if i < 4:
                skips.append(x)
                x = self.down[i](x)
        x = self.dropout(x)
        for up, stage in zip(self.up, self.dec, strict=True):
            x = stage(up(x) + skips.pop())
        return self.head(self.dropout(x))


def build_network(
    name: str, *, in_channels: int, num_classes: int, base_channels: int = 16, dropout: bool = True
) -> nn.Module:
    """The network called ``name`` ('unet2d' or 'vnet')."""
    if name == "unet2d":
        return UNet2D(in_channels, num_classes, base_channels, dropout)
    if name == "vnet":
        return VNet(in_channels, num_classes, base_channels, dropout)
    raise ValueError(f"unknown network {name!r} (choose unet2d or vnet)")


def set_dropout(model: nn.Module, active: bool) -> None:
    """Switch only the dropout layers to train (``active``) or eval mode; BatchNorm is untouched."""
    for module in model.modules():
        if isinstance(module, (nn.Dropout, nn.Dropout2d, nn.Dropout3d)):
            module.train(active)


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """The channels-last memory layout for 2D (N, C, H, W) or 3D (N, C, D, H, W) tensors."""
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, *S) in the channels-last layout (a no-op when it already is, and for C = 1 a view)."""
    return x.contiguous(memory_format=channels_last_format(x.dim() - 2))


def has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Dropout3d)) and m.p > 0 for m in model.modules())


def spatial_divisor(name: str) -> int:
    """Input sizes must be multiples of this (four 2x poolings)."""
    return 16


def check_input_size(name: str, size: Sequence[int]) -> None:
    divisor = spatial_divisor(name)
    if any(int(s) % divisor for s in size):
        raise ValueError(f"{name} needs input sizes divisible by {divisor}, got {tuple(size)}")
