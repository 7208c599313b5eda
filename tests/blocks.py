"""Hand-written ConvNet building blocks shared by the tests (no timm / torchvision).

Every block is an ``nn.Module`` taking ``[N, cin, H, W]``. ``make_block(kind, cin, cout, stride, act)``
builds any of ``BLOCK_KINDS`` with the given channel counts; ``ConvNet`` stacks blocks behind a stem
and in front of a pooled linear head; ``randomize(model, seed)`` gives every conv, norm and linear
random weights *and* random BatchNorm running statistics (fresh BN is the identity and hides bugs).

Reparameterisable blocks (RepVGG, MobileOne-style, ACNet/DBB-style, FastViT's RepMixer token mixer, and
NestedBranches: branches nested, subtracted and scaled) have a ``reparameterize()`` that returns the
single ``nn.Conv2d`` equal to the block's linear part (written independently of qlfx's merge-parallel
pass, the way the RepVGG authors do it: fuse each conv+BN, pad 1x1 to 3x3, identity as a one-hot 3x3
kernel, sum). RepMixer and NestedBranches (cin == cout) are not in ``BLOCK_KINDS``, which other test files
parametrize over.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qlfx.models import randomize_batchnorm

ACTIVATIONS = ("relu", "relu6", "hardswish", "silu", "gelu", "leaky_relu", "hardtanh")


def make_act(name: str | None) -> nn.Module:
    return {
        None: nn.Identity, "none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish,
        "silu": nn.SiLU, "gelu": nn.GELU, "leaky_relu": lambda: nn.LeakyReLU(0.1),
        "hardtanh": nn.Hardtanh,
    }[name]()


class ConvBN(nn.Sequential):
    """conv (no bias) -> BN -> optional activation."""

    def __init__(self, cin, cout, k=3, stride=1, padding=None, groups=1, dilation=1, act=None):
        padding = dilation * (k // 2) if padding is None else padding
        layers = [nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(make_act(act))
        super().__init__(*layers)


def _fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') with BN(conv(x)) = conv'(x), in float64."""
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
    return conv.weight.double() * s.view(-1, 1, 1, 1), (b - bn.running_mean.double()) * s + bn.bias.double()


def _identity_bn_kernel(bn: nn.BatchNorm2d, channels: int, groups: int, k: int = 3):
    """BN(x) as a k x k grouped kernel: s_i at the centre of the (i, i mod C/g) slice."""
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    m = channels // groups
    w = torch.zeros(channels, m, k, k, dtype=torch.float64)
    w[torch.arange(channels), torch.arange(channels) % m, k // 2, k // 2] = s
    return w, bn.bias.double() - bn.running_mean.double() * s


def _plain_conv(cin, cout, k, stride, groups, weight, bias) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(weight.float())
        conv.bias.copy_(bias.float())
    return conv.eval()


class RepVGGBlock(nn.Module):
    """RepVGG (Ding et al. 2021): relu(BN(conv3x3 x) + BN(conv1x1 x) + BN(x)); the identity branch only
    when stride 1 and cin == cout. ``reparameterize()`` returns the equivalent single 3x3 conv."""

    def __init__(self, cin, cout, stride=1, groups=1, act="relu"):
        super().__init__()
        self.cin, self.cout, self.stride, self.groups = cin, cout, stride, groups
        self.dense = ConvBN(cin, cout, 3, stride, 1, groups)
        self.pointwise = ConvBN(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = make_act(act)

    def forward(self, x):
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        w3, b3 = _fuse_conv_bn(self.dense[0], self.dense[1])
        w1, b1 = _fuse_conv_bn(self.pointwise[0], self.pointwise[1])
        weight, bias = w3 + F.pad(w1, [1, 1, 1, 1]), b3 + b1
        if self.identity is not None:
            wi, bi = _identity_bn_kernel(self.identity, self.cin, self.groups)
            weight, bias = weight + wi, bias + bi
        return _plain_conv(self.cin, self.cout, 3, self.stride, self.groups, weight, bias)

    def deployed(self) -> nn.Module:
        """The block as RepVGG deploys it: act(reparameterized conv)."""
        return nn.Sequential(self.reparameterize(), self.act).eval()


class MobileOneBlock(nn.Module):
    """MobileOne-style (Vasu et al. 2023): ``branches`` parallel 3x3 conv+BN, a 1x1 conv+BN "scale"
    branch and a BN identity, depthwise when ``depthwise`` (groups = channels)."""

    def __init__(self, channels, branches=2, depthwise=True, act="relu"):
        super().__init__()
        self.channels = channels
        self.groups = channels if depthwise else 1
        self.convs = nn.ModuleList(ConvBN(channels, channels, 3, 1, 1, self.groups) for _ in range(branches))
        self.scale = ConvBN(channels, channels, 1, 1, 0, self.groups)
        self.identity = nn.BatchNorm2d(channels)
        self.act = make_act(act)

    def forward(self, x):
        y = self.scale(x) + self.identity(x)
        for c in self.convs:
            y = y + c(x)
        return self.act(y)

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        weight, bias = _identity_bn_kernel(self.identity, self.channels, self.groups)
        w1, b1 = _fuse_conv_bn(self.scale[0], self.scale[1])
        weight, bias = weight + F.pad(w1, [1, 1, 1, 1]), bias + b1
        for c in self.convs:
            w, b = _fuse_conv_bn(c[0], c[1])
            weight, bias = weight + w, bias + b
        return _plain_conv(self.channels, self.channels, 3, 1, self.groups, weight, bias)


class ACBlock(nn.Module):
    """ACNet / Diverse-Branch-Block style: 3x3 + 1x3 + 3x1 + 1x1 conv+BN branches (asymmetric kernels
    exercise per-axis tap placement)."""

    def __init__(self, cin, cout, stride=1, act="relu"):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.square = ConvBN(cin, cout, 3, stride, 1)
        self.hor = ConvBN(cin, cout, (1, 3), stride, (0, 1))
        self.ver = ConvBN(cin, cout, (3, 1), stride, (1, 0))
        self.point = ConvBN(cin, cout, 1, stride, 0)
        self.act = make_act(act)

    def forward(self, x):
        return self.act(self.square(x) + self.hor(x) + self.ver(x) + self.point(x))

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        w, b = _fuse_conv_bn(self.square[0], self.square[1])
        wh, bh = _fuse_conv_bn(self.hor[0], self.hor[1])
        wv, bv = _fuse_conv_bn(self.ver[0], self.ver[1])
        wp, bp = _fuse_conv_bn(self.point[0], self.point[1])
        w = w + F.pad(wh, [0, 0, 1, 1]) + F.pad(wv, [1, 1, 0, 0]) + F.pad(wp, [1, 1, 1, 1])
        return _plain_conv(self.cin, self.cout, 3, self.stride, 1, w, b + bh + bv + bp)


class RepMixer(nn.Module):
    """FastViT's token mixer (Vasu et al. 2023) written the way timm writes it:
    ``x + gamma * (mixer(x) - norm(x))`` with ``mixer`` a depthwise MobileOne block without activation
    (BN identity + 1x1 + kxk conv+BN branches, accumulated with ``+=``) and ``norm`` a BN-only branch
    (``0 + BN(x)``: its absent conv branches are the number 0). ``gamma`` is a per-channel layer scale
    with distinct signed values. ``reparameterize()`` returns the one depthwise kxk conv."""

    def __init__(self, dim, kernel=3):
        super().__init__()
        self.dim, self.kernel = dim, kernel
        self.mixer_identity = nn.BatchNorm2d(dim)
        self.mixer_scale = ConvBN(dim, dim, 1, 1, 0, groups=dim)
        self.mixer_kxk = nn.ModuleList([ConvBN(dim, dim, kernel, 1, kernel // 2, groups=dim)])
        self.norm_identity = nn.BatchNorm2d(dim)
        self.gamma = nn.Parameter(torch.linspace(-1.2, 1.5, dim).view(dim, 1, 1))

    def mixer(self, x):
        out = self.mixer_scale(x) + self.mixer_identity(x)
        for rc in self.mixer_kxk:
            out += rc(x)
        return out

    def norm(self, x):
        scale_out = 0
        return scale_out + self.norm_identity(x)

    def forward(self, x):
        return x + self.gamma * (self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        k, c = self.kernel, self.dim
        identity = torch.zeros(c, 1, k, k, dtype=torch.float64)
        identity[:, 0, k // 2, k // 2] = 1.0
        wi, bi = _identity_bn_kernel(self.mixer_identity, c, c, k)
        ws, bs = _fuse_conv_bn(self.mixer_scale[0], self.mixer_scale[1])
        wk, bk = _fuse_conv_bn(self.mixer_kxk[0][0], self.mixer_kxk[0][1])
        wn, bn = _identity_bn_kernel(self.norm_identity, c, c, k)
        pad = (k - 1) // 2
        g = self.gamma.double().view(-1)
        weight = identity + g.view(-1, 1, 1, 1) * (wi + F.pad(ws, [pad] * 4) + wk - wn)
        return _plain_conv(c, c, k, 1, c, weight, g * (bi + bs + bk - bn))


class NestedBranches(nn.Module):
    """Parallel branches summed the long way round — nested, subtracted, negated, scaled and divided by
    numbers, a number added — and an identity: all linear in x, so one conv before the ReLU.
    ``reparameterize()`` returns it, expanded by hand:
    ``x - y = x + b/2 - BN(x)/4 + a/4 + 1 - 2 c``."""

    def __init__(self, c=4):
        super().__init__()
        self.c = c
        self.a = ConvBN(c, c, 3)
        self.b = nn.Conv2d(c, c, 1)
        self.h = ConvBN(c, c, (1, 3), padding=(0, 1))
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        y = 0.5 * self.b(x) - (self.bn(x) - self.a(x)) / 4
        y = -(y + 1.0) + 2 * self.h(x)
        return self.act(1.0 - (y - x) - 1.0)  # x - y, with a reversed subtraction (aten.rsub)

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        c = self.c
        identity = torch.zeros(c, c, 3, 3, dtype=torch.float64)
        identity[torch.arange(c), torch.arange(c), 1, 1] = 1.0
        wa, ba = _fuse_conv_bn(self.a[0], self.a[1])
        wh, bh = _fuse_conv_bn(self.h[0], self.h[1])
        wn, bn = _identity_bn_kernel(self.bn, c, 1)
        wb, bb = self.b.weight.double(), self.b.bias.double()
        weight = identity + 0.5 * F.pad(wb, [1, 1, 1, 1]) - wn / 4 + wa / 4 - 2 * F.pad(wh, [0, 0, 1, 1])
        return _plain_conv(c, c, 3, 1, 1, weight, 0.5 * bb - bn / 4 + ba / 4 + 1.0 - 2 * bh)


class UncentredParallel(nn.Module):
    """conv3x3(pad 0, stride 3) + conv1x1(pad 0, stride 3): on a 6x6 input both give 2x2 outputs, but
    the 1x1 reads the *top-left* tap of each 3x3 window, not the centre. Padding the 1x1 kernel to 3x3
    centred (the RepVGG recipe) would be wrong here; the merged kernel must hold it at (0, 0)."""

    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, 3, 0)
        self.b = nn.Conv2d(c, c, 1, 3, 0)

    def forward(self, x):
        return self.a(x) + self.b(x)

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        w = self.a.weight.double() + F.pad(self.b.weight.double(), [0, 2, 0, 2])
        conv = nn.Conv2d(self.a.in_channels, self.a.out_channels, 3, 3, 0)
        conv.weight.copy_(w.float())
        conv.bias.copy_((self.a.bias.double() + self.b.bias.double()).float())
        return conv.eval()


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 -> 3x3 (stride, dilation, groups) -> 1x1, + shortcut, relu.
    ``shortcut``: "identity" (needs stride 1 and cin == cout), "conv" (strided 1x1 conv + BN) or
    "avgpool" (ResNet-D: 2x2 avg-pool, then 1x1 conv + BN)."""

    def __init__(self, cin, cout, stride=1, groups=1, dilation=1, shortcut=None, act="relu", mid=None):
        super().__init__()
        mid = mid or max(groups, (cout // 2) // groups * groups) or groups
        self.conv1 = ConvBN(cin, mid, 1, act=act)
        self.conv2 = ConvBN(mid, mid, 3, stride, groups=groups, dilation=dilation, act=act)
        self.conv3 = ConvBN(mid, cout, 1)
        if shortcut is None:
            shortcut = "identity" if stride == 1 and cin == cout else "conv"
        if shortcut == "identity":
            self.shortcut = nn.Identity()
        elif shortcut == "conv":
            self.shortcut = ConvBN(cin, cout, 1, stride, 0)
        elif shortcut == "avgpool":
            pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
            self.shortcut = nn.Sequential(pool, ConvBN(cin, cout, 1, 1, 0))
        else:
            raise ValueError(shortcut)
        self.act = make_act(act)

    def forward(self, x):
        return self.act(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class SqueezeExcite(nn.Module):
    """x * gate(x), gate = sigmoid(conv1x1(relu(conv1x1(avgpool(x))))): a product with a nonlinear gate,
    not a product of two linear branches (fuse-product must leave it alone)."""

    def __init__(self, channels, reduced=None, gate="sigmoid"):
        super().__init__()
        reduced = reduced or max(2, channels // 4)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid() if gate == "sigmoid" else nn.Hardsigmoid()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(F.relu(self.reduce(s))))


class DepthwiseSeparableSE(nn.Module):
    """MobileNetV1/EfficientNet-style: depthwise 3x3 + BN + act, squeeze-excitation, pointwise 1x1 + BN."""

    def __init__(self, cin, cout, stride=1, act="relu"):
        super().__init__()
        self.dw = ConvBN(cin, cin, 3, stride, groups=cin, act=act)
        self.se = SqueezeExcite(cin)
        self.pw = ConvBN(cin, cout, 1)

    def forward(self, x):
        return self.pw(self.se(self.dw(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3: 1x1 expand + BN + act, depthwise 3x3 + BN + act, optional SE (hard-sigmoid gate),
    1x1 project + BN, residual when stride 1 and cin == cout."""

    def __init__(self, cin, cout, stride=1, expand=3, act="hardswish", se=True):
        super().__init__()
        hidden = cin * expand
        self.expand = ConvBN(cin, hidden, 1, act=act)
        self.dw = ConvBN(hidden, hidden, 3, stride, groups=hidden, act=act)
        self.se = SqueezeExcite(hidden, gate="hardsigmoid") if se else nn.Identity()
        self.project = ConvBN(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (ConvNeXt): permute to NHWC, normalise, permute back."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class NormBlock(nn.Module):
    """conv3x3 -> GroupNorm or LayerNorm2d -> act (+ residual when shapes allow)."""

    def __init__(self, cin, cout, stride=1, norm="group", act="gelu"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.norm = nn.GroupNorm(2 if cout % 2 == 0 else 1, cout) if norm == "group" else LayerNorm2d(cout)
        self.act = make_act(act)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.act(self.norm(self.conv(x)))
        return x + y if self.residual else y


class ConcatBlock(nn.Module):
    """Inception / DenseNet style: branches concatenated on channels. cout is split over 4 branches:
    1x1, 3x3, dilated 3x3 (dilation 2), and 3x3 max-pool -> 1x1."""

    def __init__(self, cin, cout, stride=1, act="relu"):
        super().__init__()
        q = max(1, cout // 4)
        widths = [q, q, q, cout - 3 * q]
        self.b1 = ConvBN(cin, widths[0], 1, stride, 0, act=act)
        self.b2 = ConvBN(cin, widths[1], 3, stride, act=act)
        self.b3 = ConvBN(cin, widths[2], 3, stride, dilation=2, act=act)
        self.pool = nn.MaxPool2d(3, stride, 1)
        self.b4 = ConvBN(cin, widths[3], 1, act=act)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(self.pool(x))], dim=1)


class GroupedConvBlock(nn.Module):
    """ResNeXt-style: grouped 3x3 conv + BN + act, residual when shapes allow."""

    def __init__(self, cin, cout, stride=1, groups=2, act="relu"):
        super().__init__()
        g = groups if cin % groups == 0 and cout % groups == 0 else 1
        self.conv = ConvBN(cin, cout, 3, stride, groups=g, act=act)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y


class DilatedBlock(nn.Module):
    """3x3 conv with dilation 2 (padding 2) + BN + act."""

    def __init__(self, cin, cout, stride=1, act="relu"):
        super().__init__()
        self.conv = ConvBN(cin, cout, 3, stride, dilation=2, act=act)

    def forward(self, x):
        return self.conv(x)


def make_block(kind: str, cin: int, cout: int, stride: int = 1, act: str = "relu") -> nn.Module:
    """One block of ``kind`` mapping cin -> cout channels (blocks that need cin == cout, like MobileOne,
    get a 1x1 conv+BN in front when the widths differ)."""
    if kind == "repvgg":
        return RepVGGBlock(cin, cout, stride, act=act)
    if kind == "repvgg_grouped":
        g = 2 if cin % 2 == 0 and cout % 2 == 0 else 1
        return RepVGGBlock(cin, cout, stride, groups=g, act=act)
    if kind == "mobileone":
        blk = MobileOneBlock(cout, branches=2, act=act)
        pre = ConvBN(cin, cout, 1, stride, 0) if (cin != cout or stride != 1) else None
        return nn.Sequential(pre, blk) if pre is not None else blk
    if kind == "acblock":
        return ACBlock(cin, cout, stride, act=act)
    if kind == "bottleneck":
        return Bottleneck(cin, cout, stride, act=act)
    if kind == "bottleneck_avgpool":
        return Bottleneck(cin, cout, stride, shortcut="avgpool" if (stride > 1 or cin != cout) else "identity", act=act)
    if kind == "bottleneck_grouped_dilated":
        return Bottleneck(cin, cout, stride, groups=2, dilation=2, act=act, mid=4)
    if kind == "dwsep_se":
        return DepthwiseSeparableSE(cin, cout, stride, act=act)
    if kind == "inverted_residual":
        return InvertedResidual(cin, cout, stride, act=act)
    if kind == "groupnorm":
        return NormBlock(cin, cout, stride, "group", act=act)
    if kind == "layernorm":
        return NormBlock(cin, cout, stride, "layer", act=act)
    if kind == "concat":
        return ConcatBlock(cin, cout, stride, act=act)
    if kind == "grouped":
        return GroupedConvBlock(cin, cout, stride, act=act)
    if kind == "dilated":
        return DilatedBlock(cin, cout, stride, act=act)
    raise ValueError(f"unknown block kind {kind!r}; known: {BLOCK_KINDS}")


BLOCK_KINDS = ("repvgg", "repvgg_grouped", "mobileone", "acblock", "bottleneck", "bottleneck_avgpool",
               "bottleneck_grouped_dilated", "dwsep_se", "inverted_residual", "groupnorm", "layernorm",
               "concat", "grouped", "dilated")


class ConvNet(nn.Module):
    """stem (3x3 conv + BN + ReLU) -> blocks -> global average pool -> linear.

    ``blocks``: a list of ``(kind, cout, stride, act)``."""

    def __init__(self, blocks, in_chans=3, stem=8, num_classes=5):
        super().__init__()
        self.stem = ConvBN(in_chans, stem, 3, 1, act="relu")
        layers, cin = [], stem
        for kind, cout, stride, act in blocks:
            layers.append(make_block(kind, cin, cout, stride, act))
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random conv/linear weights (scaled for unit-ish activations), random BN statistics and affine
    parameters (qlfx.models.randomize_batchnorm), random GroupNorm/LayerNorm affine. Returns model.eval()."""
    gen = torch.Generator().manual_seed(seed + 1000)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    randomize_batchnorm(model, seed)
    return model.eval()


def count_convs(gm) -> int:
    """conv2d call nodes in a traced graph."""
    from qlfx import ir

    return sum(1 for n in gm.graph.nodes if ir.ConvCall.of(n) is not None)


def small_convnet() -> nn.Module:
    """A small randomized ConvNet for CLI tests (``tests/blocks.py:small_convnet``, input 1,3,8,8)."""
    spec = [("bottleneck", 8, 1, "relu"), ("repvgg", 8, 2, "relu"), ("dwsep_se", 8, 1, "relu")]
    return randomize(ConvNet(spec, stem=8), seed=11)


try:
    import pytest

    @pytest.fixture(autouse=True)
    def one_torch_thread():
        """Tests on these small nets run faster on one intra-op thread (and much faster when other jobs
        load the machine: two spinning threads per process thrash). Import it into a test module to apply
        it there; the previous setting is restored after each test."""
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(previous)
except ImportError:  # blocks.py is also usable without pytest
    pass
