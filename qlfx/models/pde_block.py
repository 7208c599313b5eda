"""The authors' public QLNet layout ("PDEBlock" in their timm-based resnet.py), without timm.

State-dict keys and shapes are exactly those of the authors' ``ResNet(block=PDEBlock, ...)``, so
their checkpoints load with ``load_state_dict(strict=True)``:

    conv1.weight, bn1.*                         stem 7x7/2 conv (no bias) + BN, then ReLU, 3x3/2 maxpool
    layer{s}.{b}.conv1.conv.weight, .conv1.bn.* 1x1 conv C -> 2W, BN
    layer{s}.{b}.conv2.weight                   depthwise 3x3 W -> 2W (groups=W), stride 2 on ds blocks
    layer{s}.{b}.bn2.*
    layer{s}.{b}.conv3.conv.weight, .conv3.bn.* 1x1 conv 2W -> C_out, BN
    layer{s}.{b}.skip.conv.weight, .skip.bn.*   1x1 stride-2 conv + BN, downsampling blocks only
    fc.weight, fc.bias

Block math (u: input with C channels, W = 4C if C <= 128 else 2C):

    z   = BN(conv1x1(u))                 2W channels
    p   = z[:, :W] * z[:, W:]            the quasi-linear product
    y   = BN(dwconv3x3(p))               2W channels
    out = BN(conv1x1(y)) + skip(u)       skip = identity, or conv1x1/2 + BN when downsampling
    out = hardball_{r^2 = C_out}(out)    downsampling blocks only

The network applies hardball (r^2 = final channels, 512 by default) before global pooling and fc.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .activations import Hardball

__all__ = ["ConvBN", "PDEBlock", "QLNet", "qlnet", "qlnet50", "qlnet26", "pde_hidden_width"]


def pde_hidden_width(inplanes: int) -> int:
    """W of a PDEBlock: 4 * inplanes if inplanes <= 128 else 2 * inplanes (authors' rule)."""
    return 4 * inplanes if inplanes <= 128 else 2 * inplanes


class ConvBN(nn.Module):
    """Conv followed by BatchNorm, with children named ``conv`` and ``bn`` (authors' key names).

    The authors cache a BN-folded weight in eval mode; we do not (folding is a qlfx pass).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class PDEBlock(nn.Module):
    """One quasi-linear block of the authors' layout (see the module docstring for the math).

    ``inplanes -> outplanes``; the block downsamples (skip conv + hardball) when stride != 1 or the
    widths differ, as in the authors' ``make_blocks``.
    """

    def __init__(self, inplanes: int, outplanes: int, stride: int = 1):
        super().__init__()
        width = pde_hidden_width(inplanes)
        downsample = stride != 1 or inplanes != outplanes
        self.inplanes = inplanes
        self.outplanes = outplanes
        self.stride = stride
        self.width = width  # W: the product multiplies channels [0, W) by [W, 2W)

        self.conv1 = ConvBN(nn.Conv2d(inplanes, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width))
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=stride, padding=1, groups=width, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = ConvBN(nn.Conv2d(2 * width, outplanes, 1, bias=False), nn.BatchNorm2d(outplanes))
        if downsample:
            self.skip = ConvBN(
                nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), nn.BatchNorm2d(outplanes)
            )
            self.act3 = Hardball(radius=math.sqrt(outplanes))
        else:
            self.skip = nn.Identity()
            self.act3 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.skip(x)
        z = self.conv1(x)
        p = z[:, : self.width] * z[:, self.width :]
        y = self.bn2(self.conv2(p))
        out = self.conv3(y) + shortcut
        if self.act3 is not None:
            out = self.act3(out)
        return out


class GlobalAvgPool(nn.Module):
    """Adaptive average pool to 1x1 and flatten to (N, C); no parameters (timm's SelectAdaptivePool2d)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(x))


def _check_widths(widths: Sequence[int], layers: Sequence[int]) -> None:
    if len(widths) != 4 or len(layers) != 4:
        raise ValueError(f"need 4 stages: got widths={tuple(widths)}, layers={tuple(layers)}")
    if any(n < 1 for n in layers):
        raise ValueError(f"every stage needs at least one block, got layers={tuple(layers)}")


class QLNet(nn.Module):
    """ResNet shell with PDEBlocks (authors' public layout; see module docstring for the keys)."""

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        widths: Sequence[int] = (64, 128, 256, 512),
        in_chans: int = 3,
    ):
        super().__init__()
        _check_widths(widths, layers)
        self.layers_config = tuple(int(n) for n in layers)
        self.widths = tuple(int(w) for w in widths)
        self.num_classes = num_classes
        stem = self.widths[0]
        self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        # Not in place: passes and tests may reuse the BN output.
        self.act1 = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        inplanes = stem
        for stage_index, (planes, num_blocks) in enumerate(zip(self.widths, self.layers_config)):
            stage_stride = 1 if stage_index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(PDEBlock(inplanes, planes, stage_stride if block_index == 0 else 1))
                inplanes = planes
            self.add_module(f"layer{stage_index + 1}", nn.Sequential(*blocks))

        self.num_features = inplanes
        # Authors: hardball(radius2=512) = final channels for the default widths.
        self.act = Hardball(radius=math.sqrt(self.num_features))
        self.global_pool = GlobalAvgPool()
        self.fc = nn.Linear(self.num_features, num_classes)
        _init_convs(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.act(x)
        return self.fc(self.global_pool(x))


def _init_convs(model: nn.Module) -> None:
    """Authors' init: kaiming normal, fan_out, linear gain, for every conv.

    No zero-init of the last BN of a block (the authors' zero_init_last), so that every block is a
    non-trivial function and equivalence tests exercise it.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="linear")


def qlnet(
    layers: Sequence[int] = (3, 4, 6, 3),
    num_classes: int = 1000,
    widths: Sequence[int] = (64, 128, 256, 512),
    in_chans: int = 3,
) -> QLNet:
    """A QLNet with the authors' PDEBlock layout."""
    return QLNet(layers=layers, num_classes=num_classes, widths=widths, in_chans=in_chans)


def qlnet50(num_classes: int = 1000, **kwargs) -> QLNet:
    """Authors' ``resnet50`` entry: PDEBlocks, layers [3, 4, 6, 3]."""
    kwargs.setdefault("layers", (3, 4, 6, 3))
    return qlnet(num_classes=num_classes, **kwargs)


def qlnet26(num_classes: int = 1000, **kwargs) -> QLNet:
    """PDEBlocks, layers [3, 8, 12, 3] (the depth named in the issue)."""
    kwargs.setdefault("layers", (3, 8, 12, 3))
    return qlnet(num_classes=num_classes, **kwargs)
