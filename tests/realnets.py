"""Small versions of well-known ConvNets, written the way their public reference code writes them
(torchvision/timm style: nn.Sequential, in-place ReLU, torch.flatten, x.mean, channel shuffles,
permute + LayerNorm + Linear). No dependency on torchvision or timm. Widths are cut down so tests stay fast.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


def _make_divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


# ------------------------------------------------------------------------------------------ ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, width_per_group=16, dilation=1):
        super().__init__()
        width = int(planes * (width_per_group / 16.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation=dilation, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=10, width=16, groups=1, avg_down=False):
        super().__init__()
        self.inplanes, self.groups, self.avg_down = width, groups, avg_down
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 4 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            if self.avg_down:  # ResNet-D: avg-pool shortcut
                downsample = nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                                           nn.Conv2d(self.inplanes, planes * block.expansion, 1, bias=False),
                                           nn.BatchNorm2d(planes * block.expansion))
            else:
                downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                           nn.BatchNorm2d(planes * block.expansion))
        kw = {"groups": self.groups} if block is Bottleneck else {}
        layers = [block(self.inplanes, planes, stride, downsample, **kw)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet_basic():
    return ResNet(BasicBlock, [2, 1, 1])


def resnext_d():
    return ResNet(Bottleneck, [1, 1, 1], groups=4, avg_down=True)


# ------------------------------------------------------------------------------------- MobileNetV2
class ConvBNActivation(nn.Sequential):
    def __init__(self, inp, out, kernel=3, stride=1, groups=1, act=nn.ReLU6):
        super().__init__(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), act(inplace=True) if act is not None else nn.Identity())


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [ConvBNActivation(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [ConvBNActivation(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        setting = [[1, 8, 1, 1], [6, 12, 2, 2], [6, 16, 2, 2]]
        features = [ConvBNActivation(3, 8, stride=2)]
        inp = 8
        for t, c, n, s in setting:
            for i in range(n):
                features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(ConvBNActivation(inp, 64, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


# ----------------------------------------------------------------------- MobileNetV3 / EfficientNet
class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = gate()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class MBConv(nn.Module):
    def __init__(self, inp, exp, out, kernel, stride, use_se, act, gate):
        super().__init__()
        self.use_res = stride == 1 and inp == out
        layers = []
        if exp != inp:
            layers.append(ConvBNActivation(inp, exp, 1, act=act))
        layers.append(ConvBNActivation(exp, exp, kernel, stride, groups=exp, act=act))
        if use_se:
            layers.append(SqueezeExcitation(exp, _make_divisible(exp // 4), gate=gate))
        layers.append(ConvBNActivation(exp, out, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        result = self.block(x)
        if self.use_res:
            result += x
        return result


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        hs, re = nn.Hardswish, nn.ReLU
        cfg = [(8, 8, 8, 3, 2, True, re), (8, 24, 12, 3, 2, False, re), (12, 32, 12, 3, 1, False, re),
               (12, 48, 16, 5, 2, True, hs), (16, 64, 16, 5, 1, True, hs)]
        layers = [ConvBNActivation(3, 8, 3, 2, act=hs)]
        layers += [MBConv(*c, gate=nn.Hardsigmoid) for c in cfg]
        layers.append(ConvBNActivation(16, 64, 1, act=hs))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(64, 32), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class EfficientNetish(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        silu = nn.SiLU
        self.stem = ConvBNActivation(3, 8, 3, 2, act=silu)
        self.blocks = nn.Sequential(MBConv(8, 8, 8, 3, 1, True, silu, nn.Sigmoid),
                                    MBConv(8, 32, 12, 3, 2, True, silu, nn.Sigmoid),
                                    MBConv(12, 48, 12, 5, 1, True, silu, nn.Sigmoid))
        self.head = ConvBNActivation(12, 48, 1, act=silu)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean((2, 3)))


# --------------------------------------------------------------------------------------- ConvNeXt
class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, layer_scale=1e-1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        inp = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        return inp + x.permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    def __init__(self, num_classes=10, dims=(16, 32)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        self.stage1 = nn.Sequential(ConvNeXtBlock(dims[0]), ConvNeXtBlock(dims[0]))
        self.down = nn.Sequential(LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, 2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(dims[1]))
        self.norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.head = nn.Linear(dims[1], num_classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


# --------------------------------------------------------------------------- DenseNet / ShuffleNet
class DenseLayer(nn.Module):
    def __init__(self, num_input, growth, bn_size=2):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, inputs):
        x = torch.cat(inputs, 1) if isinstance(inputs, list) else inputs
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseNetish(nn.Module):
    def __init__(self, num_classes=10, growth=8):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, 16, 3, 1, 1, bias=False)), ("norm0", nn.BatchNorm2d(16)),
            ("relu0", nn.ReLU(inplace=True)), ("pool0", nn.MaxPool2d(2, 2))]))
        self.layers = nn.ModuleList([DenseLayer(16 + i * growth, growth) for i in range(3)])
        ch = 16 + 3 * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU(inplace=True), nn.Conv2d(ch, 16, 1, bias=False),
                                        nn.AvgPool2d(2, 2))
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        features = [self.features(x)]
        for layer in self.layers:
            features.append(layer(features))
        x = self.transition(torch.cat(features, 1))
        x = F.relu(x, inplace=True)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride = stride
        branch = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                                         nn.Conv2d(inp, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        cin = inp if stride > 1 else branch
        self.branch2 = nn.Sequential(nn.Conv2d(cin, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True),
                                     nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False), nn.BatchNorm2d(branch),
                                     nn.Conv2d(branch, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetish(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.stage = nn.Sequential(ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.stage(self.conv1(x)).mean([2, 3]))


# ---------------------------------------------------------------------------------- VGG / RepVGG-ish
class VGGish(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        cfg = [16, "M", 32, 32, "M"]
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(32 * 4, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


REAL_NETS = {
    "resnet-basic": resnet_basic,
    "resnext-d": resnext_d,
    "mobilenet-v2": MobileNetV2,
    "mobilenet-v3-small": MobileNetV3Small,
    "efficientnet-ish": EfficientNetish,
    "convnext-ish": ConvNeXtish,
    "densenet-ish": DenseNetish,
    "shufflenet-ish": ShuffleNetish,
    "vgg-ish": VGGish,
}
