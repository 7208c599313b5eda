"""A QLNet written the way the paper's authors write theirs (re-written here, not their code): a timm
ResNet shell (timm's ``make_blocks`` stages and ``SelectAdaptivePool2d`` head; the stem as wide as the
first stage, which timm's own ``ResNet`` fixes at 64) with a PDEBlock, radial activations written out by
hand.

What makes it a test of capture and analysis rather than a copy of ``qlfx.models.qlnet50``:
- the block reads its width from the tensor (``C = x.size()[1]; x[:, :C//2] * x[:, C//2:]``) and adds
  the shortcut in place (``x += x0``);
- ``ConvBN`` is a wrapper module with ``.conv`` / ``.bn`` children, and the shortcut is built from the
  conv and BN timm's ``make_blocks`` hands the block as ``downsample``;
- ``HardBall`` keeps its radius as a numpy float64 (``np.sqrt(radius2)``), computes it in forward
  from the width when none was given (``self.radius`` assigned in forward), and is written with
  ``torch.where`` on the per-pixel norm ``sqrt(sum(x*x, 1))``; ``SoftBall`` as
  ``x / sqrt(1 + |x|^2 / r^2)``.

Same channel widths, block counts, state-dict shapes and math as qlnet50 (DESIGN.md §2).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d
from timm.models.resnet import make_blocks


class HardBall(nn.Module):
    """x if |x| <= r else r x / |x|, |x| the norm over channels at each pixel; r^2 = radius2 or C."""

    def __init__(self, radius2: float | None = None):
        super().__init__()
        self.radius2 = radius2
        self.radius = None if radius2 is None else np.sqrt(radius2)

    def forward(self, x):
        if self.radius is None:
            self.radius = np.sqrt(x.size()[1])
        norm = torch.sqrt((x * x).sum(1, keepdim=True))
        return torch.where(norm > self.radius, self.radius * x / norm, x)


class SoftBall(nn.Module):
    """x / sqrt(1 + |x|^2 / r^2); r^2 = radius2 or C."""

    def __init__(self, radius2: float | None = None):
        super().__init__()
        self.radius2 = radius2

    def forward(self, x):
        radius2 = self.radius2 if self.radius2 is not None else x.size()[1]
        return x / torch.sqrt(1 + (x * x).sum(1, keepdim=True) / radius2)


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x):
        return self.bn(self.conv(x))


class PDEBlock(nn.Module):
    """u -> conv1x1+BN to 2W, halves multiplied, depthwise 3x3 + BN to 2W, conv1x1+BN, + shortcut,
    ``act`` after downsampling blocks. W = 4C if C <= 128 else 2C. Takes timm's block arguments."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, act=HardBall, **timm_kwargs):
        super().__init__()
        width = 4 * inplanes if inplanes <= 128 else 2 * inplanes
        self.conv1 = ConvBN(nn.Conv2d(inplanes, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width))
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=stride, padding=1, groups=width, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = ConvBN(nn.Conv2d(2 * width, planes, 1, bias=False), nn.BatchNorm2d(planes))
        if downsample is not None:
            self.skip = ConvBN(downsample[0], downsample[1])
            self.act3 = act()  # radius from the width it sees: r^2 = planes
        else:
            self.skip = None
            self.act3 = None

    def forward(self, x):
        x0 = self.skip(x) if self.skip is not None else x
        x = self.conv1(x)
        C = x.size()[1]
        x = x[:, :C // 2] * x[:, C // 2:]
        x = self.bn2(self.conv2(x))
        x = self.conv3(x)
        x += x0
        if self.act3 is not None:
            x = self.act3(x)
        return x


class AuthorsResNet(nn.Module):
    """Stem 7x7/2 conv + BN + ReLU + 3x3/2 max-pool, four stages of PDEBlocks, the radial activation,
    global average pool, linear head; timm's module names (conv1, bn1, layer1..4, global_pool, fc)."""

    def __init__(self, layers, num_classes, widths, act):
        super().__init__()
        stem = widths[0]
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, _ = make_blocks((PDEBlock,) * 4, tuple(widths), tuple(layers), stem,
                                norm_layer=nn.BatchNorm2d, act=act)
        for name, stage in stages:
            self.add_module(name, stage)
        self.act = act(widths[-1])  # radius2 given, as the authors' hardball(radius2=512)
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward_features(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.act(x)

    def forward_head(self, x):
        return self.fc(self.global_pool(x))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def authors_resnet(layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000,
                   widths: Sequence[int] = (64, 128, 256, 512), act: type = HardBall) -> nn.Module:
    """The authors-style QLNet: ``layers`` blocks per stage, stage ``widths`` (the stem is as wide as the
    first stage; the zoo's ``qlnet(layers, num_classes, widths)`` has the same arguments); ``act`` the
    radial activation class (HardBall or SoftBall). A tiny variant:
    ``authors_resnet((1, 1, 1, 1), 10, (8, 16, 32, 64))``."""
    return AuthorsResNet(layers, num_classes, widths, act)
