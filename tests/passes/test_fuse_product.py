"""fuse-product and the qlfx::branch_product op it emits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import qlfx
import qlfx.ops  # noqa: F401
import qlfx.passes.fuse_product  # noqa: F401  (registers the pass even before passes/__init__ imports it)
from qlfx.models import QLNet, create_model, qlnet, qlnet_eq3, randomize_batchnorm
from qlfx.pass_manager import PassContext, get_pass
from qlfx.requirements import CONSTANTS_FOLDED
from qlfx.verify import Tolerance, compare_tensor, run_outputs

from blocks import ConvNet, randomize

PIPELINE = "fold-bn,constant-fold,dce,fuse-product"
BRANCH_PRODUCT = torch.ops.qlfx.branch_product.default


def fused_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is BRANCH_PRODUCT]


def products(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if qlfx.ir.is_mul(n) and all(isinstance(a, fx.Node) for a in n.args)]


def fuse_result(compiled):
    row = [r for r in compiled.report.rows if r.pass_name == "fuse-product"][-1]
    return row.result


def compile_and_check(model: nn.Module, x: torch.Tensor, passes: str = PIPELINE):
    """Compile (the pass manager verifies each pass) and compare, independently, with the eager model."""
    compiled = qlfx.compile(model, passes, example_inputs=(x,))
    with torch.no_grad():
        for seed in (1, 2):
            xi = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
            check = compare_tensor(model(xi), compiled(xi), Tolerance())
            assert check.passed, check
    return compiled


# ------------------------------------------------------------------------------------ the op itself
def _conv_reference(x, w, b, stride, padding, dilation, groups):
    """conv2d written with unfold + einsum in float64 (independent of F.conv2d)."""
    x, w = x.double(), w.double()
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # n, c*kh*kw, L
    cols = cols.view(n, groups, cg * kh * kw, -1)
    wg = w.view(groups, m // groups, cg * kh * kw)
    out = torch.einsum("gok,ngkl->ngol", wg, cols).reshape(n, m, -1)
    if b is not None:
        out = out + b.double().view(1, -1, 1)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    return out.view(n, m, ho, -1)


@pytest.mark.parametrize("kind", ["pointwise", "depthwise"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_op_matches_independent_reference(kind, with_bias):
    gen = torch.Generator().manual_seed(3)
    c, m = 4, 8
    x = torch.randn(2, c, 9, 7, generator=gen)
    wa = torch.randn(m, c, 1, 1, generator=gen)
    ba = torch.randn(m, generator=gen) if with_bias else None
    if kind == "pointwise":
        wb, groups, padding = torch.randn(m, c, 1, 1, generator=gen), 1, (0, 0)
    else:
        wb, groups, padding = torch.randn(m, 1, 3, 3, generator=gen), c, (1, 1)
    bb = torch.randn(m, generator=gen) if with_bias else None
    got = torch.ops.qlfx.branch_product(x, wa, ba, wb, bb, [2, 2], list(padding), [1, 1], groups)
    want = _conv_reference(x, wa, ba, (2, 2), (0, 0), (1, 1), 1) * _conv_reference(x, wb, bb, (2, 2), padding,
                                                                                  (1, 1), groups)
    assert got.shape == want.shape == (2, m, 5, 4)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


def test_op_registration_fake_and_autograd():
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    wa = torch.randn(8, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    wb = torch.randn(8, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    ba = torch.randn(8, dtype=torch.float64)
    args = (x, wa, ba, wb, None, [1, 1], [1, 1], [1, 1], 4)
    torch.library.opcheck(BRANCH_PRODUCT, args, test_utils=("test_schema", "test_autograd_registration",
                                                             "test_faketensor"))
    assert torch.autograd.gradcheck(lambda x, wa, wb: BRANCH_PRODUCT(x, wa, ba, wb, None, [1, 1], [1, 1], [1, 1], 4),
                                    (x, wa, wb))
    import importlib

    importlib.reload(qlfx.ops)  # registering twice must be harmless
    assert torch.ops.qlfx.branch_product.default is BRANCH_PRODUCT


def test_op_rejects_mismatched_branch_sizes():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(RuntimeError, match="padding_b"):
        BRANCH_PRODUCT(x, torch.randn(8, 4, 1, 1), None, torch.randn(8, 1, 3, 3), None, [1, 1], [0, 0], [1, 1], 4)


# ----------------------------------------------------------------------------- zoo: both layouts
TINY = dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)


@pytest.mark.parametrize("build", [
    lambda: qlnet(**TINY),
    lambda: qlnet(layers=(2, 1, 2, 1), widths=(8, 16, 32, 64), num_classes=10),
    lambda: qlnet_eq3(**TINY),
    lambda: qlnet_eq3(**TINY, activation="hardball"),
    lambda: qlnet_eq3(layers=(2, 1, 1, 2), widths=(8, 16, 32, 64), num_classes=10, weight_sharing=False),
    lambda: qlnet_eq3(**TINY, expansion=6, activation="relu_all"),
], ids=["pde-tiny", "pde-2121", "eq3-tiny", "eq3-hardball", "eq3-nows-2112", "eq3-x6-relu"])
def test_zoo_fuses_one_site_per_block(build):
    model = randomize_batchnorm(build(), seed=5).eval()
    blocks = sum(model.layers_config)
    compiled = compile_and_check(model, torch.randn(1, 3, 32, 32))
    gm = compiled.graph_module
    result = fuse_result(compiled)
    assert len(result.rewrites) == blocks
    assert len(fused_nodes(gm)) == blocks
    assert not products(gm), "every branch product is fused"
    assert not result.skipped
    kind = "pointwise" if isinstance(model, QLNet) else "depthwise"
    assert result.stats[kind] == blocks
    # The op reads the block input and stored constants only.
    for node in fused_nodes(gm):
        assert all(a.op == "get_attr" for a in node.args[1:5] if a is not None)


@pytest.mark.slow  # 30-80 s on 2 busy cores: the pass manager copies and checks a 25M-parameter graph per pass
@pytest.mark.parametrize("name", ["qlnet50", "qlnet-eq3"])
def test_full_size_zoo_model(name):
    """All 16 blocks of the full-size layouts, at a small input size to stay fast."""
    model = randomize_batchnorm(create_model(name), seed=7).eval()
    compiled = compile_and_check(model, torch.randn(1, 3, 64, 64))
    assert len(fused_nodes(compiled.graph_module)) == sum(model.layers_config) == 16


def test_eq3_before_constant_fold_says_why():
    """The shared kernel w.repeat(C,1,1,1) is computed in the graph until constant-fold stores it."""
    model = randomize_batchnorm(qlnet_eq3(**TINY), seed=1).eval()
    compiled = compile_and_check(model, torch.randn(1, 3, 32, 32), "fold-bn,fuse-product")
    result = fuse_result(compiled)
    assert not fused_nodes(compiled.graph_module)
    assert len(result.skipped) == 4
    assert all("computed in the graph" in s.reason and s.needs is CONSTANTS_FOLDED for s in result.skipped)
    assert all("run constant-fold first" in str(s) for s in result.skipped)


# ------------------------------------------------------------------------------------ toy models
class Glu(nn.Module):
    """conv_a(u) * conv_b(u): bilinear GLU-style gating with two biased 1x1 convs."""

    def __init__(self, c=6, m=10, stride=1, swap=False):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a = nn.Conv2d(c, m, 1, stride=stride)
        self.b = nn.Conv2d(c, m, 1, stride=stride)
        self.head = nn.Conv2d(m, 4, 1)
        self.swap = swap

    def forward(self, x):
        u = torch.relu(self.stem(x))
        p = self.b(u) * self.a(u) if self.swap else self.a(u) * self.b(u)
        return self.head(p)


class DwFirst(nn.Module):
    """dw3x3(u) * conv1x1(u), the depthwise factor first (the pass must put the 1x1 in the a slot)."""

    def __init__(self, c=4, k=2, stride=2, bn=True):
        super().__init__()
        self.dw = nn.Conv2d(c, k * c, 3, stride=stride, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(k * c) if bn else nn.Identity()
        self.pw = nn.Conv2d(c, k * c, 1, stride=stride)

    def forward(self, u):
        return self.bn(self.dw(u)) * self.pw(u)


@pytest.mark.parametrize("model", [Glu(), Glu(stride=2, swap=True), DwFirst(), DwFirst(k=3, stride=1)],
                         ids=["glu", "glu-stride2-swapped", "dw-first-bn", "dw-first-k3"])
def test_toy_products_are_fused(model):
    model = randomize(model, seed=2)
    x = torch.randn(2, model.stem.in_channels if hasattr(model, "stem") else 4, 10, 10)
    compiled = compile_and_check(model, x)
    assert len(fused_nodes(compiled.graph_module)) == 1
    assert not products(compiled.graph_module)


def test_squeeze_excitation_left_alone():
    model = randomize(ConvNet([("dwsep_se", 8, 1, "relu"), ("inverted_residual", 8, 1, "hardswish")]), seed=4)
    compiled = compile_and_check(model, torch.randn(1, 3, 12, 12))
    gm = compiled.graph_module
    assert not fused_nodes(gm)
    assert len(products(gm)) == 2, "both SE gates stay products"
    result = fuse_result(compiled)
    assert not result.changed
    assert len(result.skipped) == 2
    assert all("not a conv" in s.reason for s in result.skipped)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 6, 1)
        self.b = nn.Conv2d(4, 6, 1)

    def forward(self, u, v):
        return self.a(u) * self.b(v)


def test_factors_from_different_inputs_left_alone():
    model = randomize(TwoInputs(), seed=1)
    u, v = torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)
    compiled = qlfx.compile(model, PIPELINE, example_inputs=(u, v))
    assert not fused_nodes(compiled.graph_module)
    (skip,) = fuse_result(compiled).skipped
    assert "different inputs" in skip.reason


class SplitWithOtherUse(nn.Module):
    """z[:, :M] * z[:, M:] where z is also returned: fusing would compute the conv twice."""

    def __init__(self, c=4, m=5):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * m, 1)
        self.m = m

    def forward(self, u):
        z = self.conv(u)
        return z[:, : self.m] * z[:, self.m:], z


class ConvWithOtherUse(nn.Module):
    def __init__(self, c=4, m=5):
        super().__init__()
        self.a = nn.Conv2d(c, m, 1)
        self.b = nn.Conv2d(c, m, 1)

    def forward(self, u):
        a = self.a(u)
        return a * self.b(u) + a


@pytest.mark.parametrize("model", [SplitWithOtherUse(), ConvWithOtherUse()], ids=["split", "conv"])
def test_conv_output_with_other_users_left_alone(model):
    model = randomize(model, seed=1)
    compiled = compile_and_check_any(model, torch.randn(1, 4, 6, 6))
    assert not fused_nodes(compiled.graph_module)
    (skip,) = fuse_result(compiled).skipped
    assert "also used" in skip.reason


def compile_and_check_any(model, x):
    """compile_and_check for models with one or several outputs."""
    compiled = qlfx.compile(model, PIPELINE, example_inputs=(x,))
    want, got = run_outputs(model, (x,)), run_outputs(compiled.graph_module, (x,))
    assert len(want) == len(got)
    for ref, new in zip(want, got):
        assert compare_tensor(ref, new, Tolerance()).passed
    return compiled


class DifferentStrides(nn.Module):
    """Same output size from different strides (1x1/2 vs dilated 3x3/1 unpadded on 8x8): not one op."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1, stride=2)
        self.b = nn.Conv2d(4, 4, 3, stride=1, dilation=2, groups=4)

    def forward(self, u):
        return self.a(u) * self.b(u)


def test_different_strides_left_alone():
    model = randomize(DifferentStrides(), seed=1)
    compiled = compile_and_check(model, torch.randn(1, 4, 8, 8))
    (skip,) = fuse_result(compiled).skipped
    assert "strides" in skip.reason


# --------------------------------------------------------------- which rows: halves, slices, bias
class OddSlices(nn.Module):
    """z[:, 1:5] * z[:, 7:11] of a 12-output biased conv (not the halves: catches off-by-one/wrong rows)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 1)

    def forward(self, u):
        z = self.conv(u)
        return z[:, 1:5] * z[:, 7:11]


def test_fused_op_reads_the_right_rows_and_bias():
    model = randomize(OddSlices(), seed=9)
    with torch.no_grad():
        model.conv.bias.copy_(torch.randn(12) + 2.0)  # a dropped bias changes the result a lot
    x = torch.randn(2, 3, 5, 5)
    compiled = compile_and_check(model, x)
    (node,) = fused_nodes(compiled.graph_module)
    gm = compiled.graph_module
    w, b = model.conv.weight, model.conv.bias
    wa, ba, wb, bb = (qlfx.ir.get_tensor(gm, n) for n in node.args[1:5])
    assert torch.equal(wa, w[1:5]) and torch.equal(ba, b[1:5])
    assert torch.equal(wb, w[7:11]) and torch.equal(bb, b[7:11])
    # Against a hand reference that does not use conv2d: per-pixel matrix products.
    z = torch.einsum("oc,nchw->nohw", w[:, :, 0, 0].double(), x.double()) + b.double().view(1, -1, 1, 1)
    want = z[:, 1:5] * z[:, 7:11]
    got = compiled(x).double()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    wrong_rows = z[:, 0:4] * z[:, 7:11]
    no_bias = (z - b.double().view(1, -1, 1, 1))[:, 1:5] * (z - b.double().view(1, -1, 1, 1))[:, 7:11]
    assert not torch.allclose(got, wrong_rows, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(got, no_bias, rtol=1e-3, atol=1e-3)


def test_pde_halves_map_to_weight_halves():
    """z[:, :M] * z[:, M:] -> weight_a/bias_a = rows [:M] of the folded conv1, weight_b/bias_b = rows [M:]."""
    model = randomize_batchnorm(qlnet(**TINY), seed=3).eval()
    x = torch.randn(1, 3, 32, 32)
    before = qlfx.compile(model, "fold-bn,constant-fold,dce", example_inputs=(x,), verify=False).graph_module
    after = qlfx.compile(model, PIPELINE, example_inputs=(x,), verify=False).graph_module
    blocks = [model.layer1[0], model.layer2[0], model.layer3[0], model.layer4[0]]
    for stage, (node, block) in enumerate(zip(fused_nodes(after), blocks), start=1):
        conv1 = qlfx.ir.ConvCall.of(next(n for n in before.graph.nodes if n.name == f"layer{stage}_0_conv1_conv"))
        full_w, full_b = qlfx.ir.get_tensor(before, conv1.weight), qlfx.ir.get_tensor(before, conv1.bias)
        m = block.width
        wa, ba, wb, bb = (qlfx.ir.get_tensor(after, n) for n in node.args[1:5])
        assert torch.equal(wa, full_w[:m]) and torch.equal(ba, full_b[:m])
        assert torch.equal(wb, full_w[m:]) and torch.equal(bb, full_b[m:])
        assert node.args[0].name == conv1.input.name


def test_rewrite_limit_for_bisection():
    model = randomize_batchnorm(qlnet(**TINY), seed=3).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = qlfx.compile(model, "fold-bn,constant-fold,dce", example_inputs=(x,), verify=False).graph_module
    ctx = PassContext(example_inputs=(x,), rewrite_limit=1)
    result = get_pass("fuse-product").run(gm, ctx)
    gm.recompile()
    assert len(result.rewrites) == 1 and len(fused_nodes(gm)) == 1
    assert sum("rewrite limit" in s.reason for s in result.skipped) == 3
    with torch.no_grad():
        assert compare_tensor(model(x), gm(x), Tolerance()).passed


# ------------------------------------------------------------------ slices however the user wrote them
SPELLINGS = {
    "index": lambda z, m: (z[:, :m], z[:, m:]),
    "chunk": lambda z, m: z.chunk(2, 1),
    "chunk-dim-minus-3": lambda z, m: z.chunk(2, dim=-3),
    "split": lambda z, m: torch.split(z, m, dim=1),
    "split-sizes": lambda z, m: z.split([m, m], 1),
    "tensor_split": lambda z, m: torch.tensor_split(z, 2, dim=1),
    "narrow": lambda z, m: (z.narrow(1, 0, m), z.narrow(1, m, m)),
    "shape-arithmetic": lambda z, m: (z[:, : z.shape[1] // 2], z[:, z.shape[1] // 2:]),
    "size-call": lambda z, m: (z[:, : z.size()[1] // 2], z[:, z.size()[1] // 2:]),
    "numpy-scalar": lambda z, m: (z[:, : np.int64(z.shape[1]) // 2], z[:, np.int64(z.shape[1]) // 2:]),
    "negative-bounds-swapped": lambda z, m: (z[:, -m:], z[:, :-m]),
    "slice-of-slice": lambda z, m: (z[:, 1:][:, :m], z[:, m:][:, :m]),
    "step": lambda z, m: (z[:, 0::2], z[:, 1::2]),
}


class SlicedProduct(nn.Module):
    """z = BN(conv1x1(u)) with 2M outputs; two equal-width row sets of z multiplied, written ``spelling``."""

    def __init__(self, spelling, c=3, m=5):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * m, 1)
        self.bn = nn.BatchNorm2d(2 * m)
        self.spelling, self.m = spelling, m

    def forward(self, u):
        a, b = SPELLINGS[self.spelling](self.bn(self.conv(u)), self.m)
        return a * b


def _folded_conv(model: SlicedProduct) -> tuple[torch.Tensor, torch.Tensor]:
    """BN(conv(u)) as one conv's (W, c), computed here (not by fold-bn)."""
    bn = model.bn
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return model.conv.weight * s.view(-1, 1, 1, 1), (model.conv.bias - bn.running_mean) * s + bn.bias


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_slice_spelling_is_fused_with_the_right_rows(spelling):
    model = randomize(SlicedProduct(spelling), seed=6)
    x = torch.randn(2, 3, 6, 6)
    compiled = compile_and_check(model, x)
    gm = compiled.graph_module
    (node,) = fused_nodes(gm)
    assert not products(gm) and not fuse_result(compiled).skipped
    # which rows: the same spelling applied to the row numbers themselves
    rows = [r.flatten().long() for r in SPELLINGS[spelling](torch.arange(10.0).view(1, 10, 1, 1), 5)]
    w, c = _folded_conv(model)
    wa, ba, wb, bb = (qlfx.ir.get_tensor(gm, n) for n in node.args[1:5])
    torch.testing.assert_close(wa, w[rows[0]].detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ba, c[rows[0]].detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wb, w[rows[1]].detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bb, c[rows[1]].detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spelling", ["index", "chunk", "shape-arithmetic", "step"])
def test_slices_fuse_under_a_symbolic_batch(spelling):
    """With dynamic_batch, ``z[:, :M]`` also slices dim 0 whole (``slice(z, 0, 0, INT64_MAX)``)."""
    model = randomize(SlicedProduct(spelling), seed=7)
    x = torch.randn(2, 3, 6, 6)
    compiled = qlfx.compile(model, PIPELINE, example_inputs=(x,), dynamic_batch=True)
    assert len(fused_nodes(compiled.graph_module)) == 1
    with torch.no_grad():
        for batch in (1, 3):
            xi = torch.randn(batch, 3, 6, 6)
            assert compare_tensor(model(xi), compiled(xi), Tolerance()).passed


class SpatialSlices(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, u):
        z = self.conv(u)
        return z[..., :3] * z[..., 3:]


class GroupedRows(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1, groups=2)

    def forward(self, u):
        a, b = self.conv(u).chunk(2, 1)
        return a * b


@pytest.mark.parametrize("model,shape,reason", [
    (SpatialSlices(), (1, 3, 5, 6), "along another axis than the channels"),
    (GroupedRows(), (1, 4, 5, 5), "slices the grouped conv"),
], ids=["spatial", "grouped"])
def test_slices_that_are_not_conv_rows_are_refused_with_reason(model, shape, reason):
    model = randomize(model, seed=2)
    compiled = compile_and_check(model, torch.randn(shape))
    assert not fused_nodes(compiled.graph_module)
    (skip,) = fuse_result(compiled).skipped
    assert reason in skip.reason, skip


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 4).view(4, 1, 1))

    def forward(self, u):
        return self.conv(u) * self.gamma * 2.0


def test_scaling_by_a_constant_is_no_product_and_no_noise():
    model = randomize(LayerScale(), seed=1)
    compiled = compile_and_check(model, torch.randn(1, 3, 4, 4))
    result = fuse_result(compiled)
    assert not result.changed and not result.skipped
