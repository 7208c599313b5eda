"""fold-bn: every zoo model, and batchnorm in odd places, on random weights and random BN statistics."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qlfx
from qlfx import ir
from qlfx.models import create_model, qlnet, qlnet_eq3, randomize_batchnorm

aten = torch.ops.aten


def _bn_nodes(gm):
    """Every batchnorm op left: the canonical eval form, and any other ATen batchnorm overload."""
    return [n for n in gm.graph.nodes if ir.is_op(n, ir.BATCH_NORM, aten.native_batch_norm,
                                                  aten._native_batch_norm_legit, aten._native_batch_norm_legit_functional,
                                                  aten._native_batch_norm_legit_no_training)]


def _fold(model, x, passes="fold-bn,constant-fold,dce"):
    model = randomize_batchnorm(model, seed=1).eval()
    compiled = qlfx.compile(model, passes=passes, example_inputs=(x,))
    with torch.no_grad():
        ref = model(x)
    return model, compiled, ref


TINY = {
    "pde": lambda: qlnet(layers=(1, 2, 1, 1), widths=(8, 16, 32, 64), num_classes=10),
    "eq3-ws-softball": lambda: qlnet_eq3(layers=(2, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10),
    "eq3-ws-hardball": lambda: qlnet_eq3(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10, activation="hardball"),
    "eq3-nows-x6-hardtanh": lambda: qlnet_eq3(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10,
                                              weight_sharing=False, expansion=6, activation="hardtanh"),
    "eq3-relu-all": lambda: qlnet_eq3(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10, activation="relu_all"),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_fold_bn_removes_every_batchnorm_and_keeps_outputs(name):
    x = torch.randn(2, 3, 32, 32)
    model, compiled, ref = _fold(TINY[name](), x)
    assert not _bn_nodes(compiled.graph_module)
    out = compiled(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    fold_row = compiled.report.rows[1]
    assert fold_row.pass_name == "fold-bn" and fold_row.changed and fold_row.check.passed


@pytest.mark.parametrize("name", ["qlnet50", "qlnet-eq3", "qlnet-eq3-nows"])
def test_fold_bn_full_size_zoo(name):
    x = torch.randn(1, 3, 224, 224)
    model, compiled, ref = _fold(create_model(name), x)
    assert not _bn_nodes(compiled.graph_module)
    out = compiled(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_eq3_shared_kernel_bn_goes_through_the_product_and_stays_shared():
    """With weight sharing the 3x3 weight is w.repeat(C,1,1,1): not a constant, so BN1 folds through the
    product (scale into conv_a, shift into the 3x3 bias) and the kernel stays the shared one."""
    model = qlnet_eq3(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    model, compiled, ref = _fold(model, x, passes="fold-bn")
    rewrites = compiled.report.rows[1].result.rewrites
    assert sum("through product" in r for r in rewrites) == 4
    gm = compiled.graph_module
    assert sum(1 for n in gm.graph.nodes if ir.is_op(n, aten.repeat.default)) == 4
    assert (compiled(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


class BNFirst(nn.Module):
    """BN on the raw input, then a zero-padded 3x3 conv: the shift must not leak into padded borders."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.bn(x)
        return torch.cat([self.conv(y), self.conv1(y)], dim=1)


class BNBetweenConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1, groups=1)

    def forward(self, x):
        return self.c2(self.bn(self.c1(x)))


class ReusedConv(nn.Module):
    """One conv module on two paths, BN after one of them (pytorch #197539)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2.0)


class BNIntoProduct(nn.Module):
    """a * BN(h) with h a grouped conv whose weight is computed in the graph: rule 2."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 1)
        self.k = nn.Parameter(torch.randn(2, 1, 3, 3))
        self.bn = nn.BatchNorm2d(8)

    def forward(self, u):
        h = F.conv2d(u, self.k.repeat(4, 1, 1, 1), None, 1, 1, 1, 4)
        return self.a(u) * self.bn(h)


class GroupedBNBefore(nn.Module):
    """ReLU -> BN -> grouped conv with zero padding (rule 3 with groups)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 12, 3, padding=1, groups=4)

    def forward(self, x):
        return self.conv(self.bn(torch.relu(x)))


class TrainingBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class FunctionalBN(nn.Module):
    """F.batch_norm on the module's own buffers (eps 1e-3), a numpy-scalar scale before it,
    and an in-place residual ``y += x`` after it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.register_buffer("mean", torch.linspace(-0.5, 0.5, 3))
        self.register_buffer("var", torch.linspace(0.5, 2.0, 3))
        self.weight = nn.Parameter(torch.tensor([1.5, -0.7, 0.9]))
        self.bias = nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x):
        y = F.batch_norm(self.conv(x * np.float32(0.5)), self.mean, self.var, self.weight, self.bias, False, 0.0,
                         1e-3)
        y += x
        return torch.relu_(y)


@pytest.mark.parametrize("cls,shape", [(BNFirst, (2, 3, 9, 7)), (BNBetweenConvs, (2, 3, 8, 8)),
                                       (BNIntoProduct, (2, 4, 6, 6)), (GroupedBNBefore, (2, 8, 5, 5)),
                                       (FunctionalBN, (2, 3, 5, 5))])
def test_batchnorm_in_odd_places_folds_exactly(cls, shape):
    x = torch.randn(shape)
    model, compiled, ref = _fold(cls(), x)
    assert not _bn_nodes(compiled.graph_module), compiled.report
    assert (compiled(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_conv_reused_on_two_paths_is_refused_with_reason():
    x = torch.randn(2, 3, 6, 6)
    model, compiled, ref = _fold(ReusedConv(), x)
    skipped = compiled.report.rows[1].result.skipped
    assert skipped and "other call site" in skipped[0].reason
    assert (compiled(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_batchnorm_in_training_mode_is_refused():
    model = randomize_batchnorm(TrainingBN()).eval()
    model.bn.train()
    model.training = False
    x = torch.randn(4, 3, 5, 5)
    compiled = qlfx.compile(model, passes="fold-bn", example_inputs=(x,))
    skipped = compiled.report.rows[1].result.skipped
    assert any("training mode" in s.reason for s in skipped)
    assert _bn_nodes(compiled.graph_module)


def test_padding_shift_is_not_a_constant_bias():
    """Guard for the math of rule 3: folding the BN shift into a plain bias is wrong at padded borders."""
    model = randomize_batchnorm(BNFirst(), seed=3).eval()
    s = model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
    t = model.bn.bias - model.bn.running_mean * s
    w = model.conv.weight * s.view(1, -1, 1, 1)
    naive_bias = model.conv.bias + (model.conv.weight * t.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    x = torch.randn(1, 3, 9, 7)
    naive = F.conv2d(x, w, naive_bias, padding=1)
    with torch.no_grad():
        true = model.conv(model.bn(x))
    assert (naive - true).abs().max() > 1e-3  # a naive fold would be caught
    compiled = qlfx.compile(model, passes="fold-bn", example_inputs=(x,))
    assert (compiled(x)[:, :8] - true).abs().max() <= 1e-4 * true.abs().max()


def test_bn_after_a_channel_concatenation_of_convs_folds_into_each_piece():
    """MixNet's mixed kernels: split -> convs of different sizes -> cat -> BN. BN acts per channel, so
    each piece's conv takes its own channels' scale and shift."""

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = torch.nn.ModuleList([torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
                                              torch.nn.Conv2d(3, 2, 5, padding=2)])
            self.bn = torch.nn.BatchNorm2d(6)
            self.head = torch.nn.Conv2d(6, 3, 1)

        def forward(self, x):
            return self.head(torch.relu(self.bn(torch.cat([c(x) for c in self.convs], 1))))

    model = randomize_batchnorm(Mixed(), seed=4).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = qlfx.compile(model, "fold-bn", example_inputs=(x,))
    assert not any(n.target is torch.ops.aten.batch_norm.default for n in compiled.graph_module.graph.nodes)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
    assert compiled.report.rows[1].result.rewrites == ["bn into convs_0, convs_1"]
