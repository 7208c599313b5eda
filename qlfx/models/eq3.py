"""The paper's Eq.(3) QLNet layout (reconstructed from the paper's parameter counts).

Block u (C_in channels) -> out (C_out channels), expansion k:

    h   = BN1( dw3x3(u) )             C_in -> k C_in, groups = C_in (output channel j reads input j // k)
    a   = conv1x1_a(u)                C_in -> k C_in, no bias
    out = shortcut(u) + BN2( conv1x1_out(a * h) )      k C_in -> C_out, no bias

dw3x3 with weight sharing ("ws") is ONE Conv2d(1, k, 3) kernel repeated over the C_in input channels,
i.e. output channel j uses kernel j mod k; without sharing it is a full depthwise Conv2d(C_in, k C_in).
Downsampling blocks (first block of stages 2-4) put stride 2 on dw3x3 and conv1x1_a and use a
1x1/2 conv + BN shortcut; otherwise the shortcut is the identity.

Activation: one per stage, after the FIRST block of each stage ("@ds" in the paper's Table 1:
4 of the 16 blocks), hardtanh / hardball / softball; or "relu_all": ReLU after every block.

Parameter counts (100 classes): 8,608,868 (ws, k=4), 8,728,100 (no ws, k=4), 12,971,044 (no ws, k=6),
the paper's 8.61M / 8.73M / 13.0M.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import Hardball, Softball
from .pde_block import ConvBN, GlobalAvgPool, _check_widths, _init_convs

__all__ = ["Eq3Block", "QLNetEq3", "qlnet_eq3", "EQ3_ACTIVATIONS"]

# Stage activations: name -> factory. "relu_all" is handled separately (after every block).
_STAGE_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "hardtanh": lambda: nn.Hardtanh(),  # clip to [-1, 1], PyTorch default
    "hardball": lambda: Hardball(),  # radius sqrt(C)
    "softball": lambda: Softball(),  # radius sqrt(C)
}
EQ3_ACTIVATIONS = tuple(_STAGE_ACTIVATIONS) + ("relu_all",)


class Eq3Block(nn.Module):
    """One Eq.(3) block (see module docstring); ``act`` (a module or None) is applied to the output."""

    def __init__(
        self,
        inplanes: int,
        outplanes: int,
        stride: int = 1,
        expansion: int = 4,
        weight_sharing: bool = True,
        act: nn.Module | None = None,
    ):
        super().__init__()
        if expansion < 1:
            raise ValueError(f"Eq3Block: expansion must be >= 1, got {expansion}")
        hidden = expansion * inplanes
        self.inplanes = inplanes
        self.outplanes = outplanes
        self.expansion = expansion
        self.stride = stride
        self.weight_sharing = weight_sharing

        if weight_sharing:
            # One k-kernel bank shared by all input channels; expanded in forward.
            self.dw = nn.Conv2d(1, expansion, 3, bias=False)
        else:
            self.dw = nn.Conv2d(inplanes, hidden, 3, stride=stride, padding=1, groups=inplanes, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv_a = nn.Conv2d(inplanes, hidden, 1, stride=stride, bias=False)
        self.conv_out = nn.Conv2d(hidden, outplanes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outplanes)
        if stride != 1 or inplanes != outplanes:
            self.shortcut = ConvBN(
                nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), nn.BatchNorm2d(outplanes)
            )
        else:
            self.shortcut = nn.Identity()
        self.act = act

    def depthwise(self, u: torch.Tensor) -> torch.Tensor:
        """dw3x3(u): C_in -> k C_in channels, output channel j = input channel j // k."""
        if self.weight_sharing:
            kernel = self.dw.weight.repeat(self.inplanes, 1, 1, 1)  # (k C_in, 1, 3, 3)
            return F.conv2d(u, kernel, None, self.stride, 1, 1, self.inplanes)
        return self.dw(u)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.depthwise(u))
        a = self.conv_a(u)
        out = self.shortcut(u) + self.bn2(self.conv_out(a * h))
        if self.act is not None:
            out = self.act(out)
        return out


class QLNetEq3(nn.Module):
    """ResNet shell (7x7/2 stem + BN + ReLU + maxpool, 4 stages, avg pool, fc) of Eq3Blocks."""

    def __init__(
        self,
        num_classes: int = 100,
        expansion: int = 4,
        weight_sharing: bool = True,
        activation: str = "softball",
        layers: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        in_chans: int = 3,
    ):
        super().__init__()
        if activation not in EQ3_ACTIVATIONS:
            raise ValueError(
                f"unknown Eq.(3) activation {activation!r}; valid: {', '.join(EQ3_ACTIVATIONS)}"
            )
        _check_widths(widths, layers)
        self.layers_config = tuple(int(n) for n in layers)
        self.widths = tuple(int(w) for w in widths)
        self.num_classes = num_classes
        self.expansion = expansion
        self.weight_sharing = weight_sharing
        self.activation = activation

        stem = self.widths[0]
        self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        inplanes = stem
        for stage_index, (planes, num_blocks) in enumerate(zip(self.widths, self.layers_config)):
            stage_stride = 1 if stage_index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                if activation == "relu_all":
                    act = nn.ReLU()
                elif block_index == 0:
                    act = _STAGE_ACTIVATIONS[activation]()
                else:
                    act = None
                blocks.append(
                    Eq3Block(
                        inplanes,
                        planes,
                        stride=stage_stride if block_index == 0 else 1,
                        expansion=expansion,
                        weight_sharing=weight_sharing,
                        act=act,
                    )
                )
                inplanes = planes
            self.add_module(f"layer{stage_index + 1}", nn.Sequential(*blocks))

        self.num_features = inplanes
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
        return self.fc(self.global_pool(self.forward_features(x)))


def qlnet_eq3(
    num_classes: int = 100,
    expansion: int = 4,
    weight_sharing: bool = True,
    activation: str = "softball",
    layers: Sequence[int] = (3, 4, 6, 3),
    widths: Sequence[int] = (64, 128, 256, 512),
    in_chans: int = 3,
) -> QLNetEq3:
    """The paper's Eq.(3) network; activation in ("hardtanh", "hardball", "softball", "relu_all")."""
    return QLNetEq3(
        num_classes=num_classes,
        expansion=expansion,
        weight_sharing=weight_sharing,
        activation=activation,
        layers=layers,
        widths=widths,
        in_chans=in_chans,
    )
