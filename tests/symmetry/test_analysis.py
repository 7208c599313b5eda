"""Channel-space analysis on the ATen IR: the group lattice, elements, hand-derived small models, the
ways a channel slice / residual add can be written, and the zoo."""
from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

import qlfx

from qlfx import ir
from qlfx import symmetry as sym
from qlfx.models import Hardball, Softball, create_model, qlnet_eq3, randomize_batchnorm
from qlfx.symmetry import Group, Monomial
from blocks import one_torch_thread  # noqa: F401  (autouse fixture)

FOLD = "fold-bn,constant-fold,dce"  # the BN-folded graph the analysis is specified on
G = Group


# ------------------------------------------------------------------------------------------ lattice
def test_meet_table_by_hand():
    assert sym.meet(G.O, G.MONOMIAL) is G.SIGNED_PERMUTATION
    assert sym.meet(G.O, G.POSITIVE_MONOMIAL) is G.PERMUTATION
    assert sym.meet(G.SIGNED_PERMUTATION, G.POSITIVE_MONOMIAL) is G.PERMUTATION
    assert sym.meet(G.GL, G.O) is G.O
    assert sym.meet(G.MONOMIAL, G.POSITIVE_MONOMIAL) is G.POSITIVE_MONOMIAL
    assert sym.meet(G.PERMUTATION, G.IDENTITY) is G.IDENTITY
    assert sym.meet() is G.GL
    assert sym.join(G.O, G.MONOMIAL) is G.GL
    assert sym.join(G.SIGNED_PERMUTATION, G.POSITIVE_MONOMIAL) is G.MONOMIAL
    assert sym.join(G.PERMUTATION, G.IDENTITY) is G.PERMUTATION


def test_lattice_laws():
    for a, b, c in itertools.product(Group, repeat=3):
        m = sym.meet(a, b)
        assert m is sym.meet(b, a)
        assert sym.is_subgroup(m, a) and sym.is_subgroup(m, b)
        assert sym.meet(m, c) is sym.meet(a, sym.meet(b, c))
        assert sym.meet(a, sym.join(a, b)) is a  # absorption
        # the meet is the GREATEST common subgroup
        for h in Group:
            if sym.is_subgroup(h, a) and sym.is_subgroup(h, b):
                assert sym.is_subgroup(h, m)
    assert all(sym.meet(a, a) is a for a in Group)


def test_lie_dimensions():
    assert sym.lie_dimension(G.GL, 5) == 25
    assert sym.lie_dimension(G.O, 5) == 10
    assert sym.lie_dimension(G.MONOMIAL, 5) == 5
    assert sym.lie_dimension(G.POSITIVE_MONOMIAL, 5) == 5
    assert sym.lie_dimension(G.SIGNED_PERMUTATION, 5) == 0


@pytest.mark.parametrize("group", list(Group))
def test_random_element_is_member(group):
    gen = torch.Generator().manual_seed(3)
    e = sym.random_element(group, gen, size=6)
    assert sym.is_member(e, group)
    bigger = [h for h in Group if sym.is_subgroup(group, h)]
    assert all(sym.is_member(e, h) for h in bigger)
    if group is G.O:
        assert not sym.is_member(e, G.MONOMIAL)
    if group is G.GL:
        assert not sym.is_member(e, G.O)
        assert float(torch.linalg.cond(sym.to_dense(e))) < 20  # well conditioned


def test_monomial_algebra():
    gen = torch.Generator().manual_seed(0)
    m = sym.random_element(G.MONOMIAL, gen, size=4)
    dense = sym.to_dense(m)
    assert torch.allclose(sym.to_dense(sym.inverse(m)) @ dense, torch.eye(4, dtype=torch.float64))
    assert torch.allclose(sym.to_dense(sym.kron_identity(m, 3)), torch.kron(dense, torch.eye(3, dtype=torch.float64)))
    back = sym.as_element(dense)
    assert isinstance(back, Monomial) and sym.element_equal(back, m)
    x = torch.randn(4, dtype=torch.float64)
    assert torch.allclose(dense @ x, m.scale * x[m.perm])


# ------------------------------------------------------------------------------ hand-made models
def _analyze(model: nn.Module, shape=(2, 3, 8, 8), fold=True):
    model = randomize_batchnorm(model.eval(), 1)
    x = torch.randn(shape)
    gm = qlfx.compile(model, "fold-bn,constant-fold,dce" if fold else None, example_inputs=(x,)).graph_module
    return gm, sym.analyze(gm), x


def _check_random_elements_keep_outputs(gm, report, x, seeds=(0, 1)):
    """Random elements of the analysed groups must keep the outputs (float64: exact up to ~1e-13)."""
    g64 = copy.deepcopy(gm).double()
    for seed in seeds:
        new = copy.deepcopy(g64)
        sym.apply_elements(new, report.random_elements(torch.Generator().manual_seed(seed)), report)
        with torch.no_grad():
            ref, out = g64(x.double()), new(x.double())
        assert float((ref - out).abs().max() / ref.abs().max()) < 1e-12


class ConvConv(nn.Module):
    def __init__(self, mid=None):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.mid = mid
        self.c2 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        if self.mid is not None:
            y = self.mid(y)
        return self.c2(y)


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, y):
        return self.fn(y)


@pytest.mark.parametrize("mid, group", [
    (None, G.GL),
    (nn.ReLU(), G.POSITIVE_MONOMIAL),
    (nn.Hardtanh(), G.SIGNED_PERMUTATION),
    (nn.ReLU6(), G.PERMUTATION),
    (Hardball(), G.O),
    (nn.MaxPool2d(2), G.POSITIVE_MONOMIAL),
    (nn.AvgPool2d(2), G.GL),
    (nn.Sigmoid(), G.PERMUTATION),
    # more ATen ops
    (nn.LeakyReLU(0.1), G.POSITIVE_MONOMIAL),
    (nn.AdaptiveMaxPool2d(2), G.POSITIVE_MONOMIAL),  # (values, indices) + getitem 0
    (nn.Tanh(), G.SIGNED_PERMUTATION),
    (nn.GELU(), G.PERMUTATION),
    (nn.Hardswish(), G.PERMUTATION),
    (Softball(), G.O),
    (nn.Upsample(scale_factor=2), G.GL),
    (Fn(lambda y: y.clamp(min=0)), G.POSITIVE_MONOMIAL),
    (Fn(lambda y: torch.clamp(y, -2, 2)), G.SIGNED_PERMUTATION),
    (Fn(lambda y: y * np.float64(2.5) - y / 3), G.GL),  # numpy scalars
    (Fn(lambda y: -y), G.GL),
    (Fn(lambda y: y + 1), G.PERMUTATION),  # the same shift for every channel
    (Fn(lambda y: torch.where(y > 0, y, 0.1 * y)), G.PERMUTATION),  # a per-channel condition
    (Fn(lambda y: y.permute(0, 1, 3, 2).reshape(y.shape[0], 6, -1).view(y.shape)), G.GL),
])
def test_conv_activation_conv(mid, group):
    gm, report, x = _analyze(ConvConv(mid))
    middle = report.space("c1")
    assert middle.group is group and middle.size == 6
    assert report.space("x").group is G.IDENTITY and report.space("c2").group is G.IDENTITY
    assert report.continuous_dimension == sym.lie_dimension(group, 6)
    _check_random_elements_keep_outputs(gm, report, x)


def test_a_non_group_element_changes_the_output_and_is_refused():
    """GL on a ReLU space is not a symmetry: check=True refuses it, check=False shows the damage."""
    gm, report, x = _analyze(ConvConv(nn.ReLU()))
    space = report.space("c1")
    q = sym.random_element(G.O, torch.Generator().manual_seed(0), size=space.size)
    with pytest.raises(ValueError, match="not in its group"):
        sym.apply_element(copy.deepcopy(gm), space, q, report)
    new = copy.deepcopy(gm)
    sym.apply_element(new, space, q, report, check=False)
    with torch.no_grad():
        ref, out = gm(x), new(x)
    assert float((ref - out).abs().max() / ref.abs().max()) > 1e-2


def test_a_graph_not_captured_by_qlfx_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="qlfx.trace"):
        sym.analyze(torch.fx.symbolic_trace(ConvConv(nn.ReLU())))  # torch-function level, no vals
    with pytest.raises(TypeError, match="GraphModule"):
        sym.analyze(ConvConv())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        a = self.c1(x)
        return self.c3(a + self.c2(a))


def test_residual_add_ties_spaces():
    gm, report, x = _analyze(Residual())
    stream = report.space("c1")
    assert report.space("c2") is stream and report.space("add") is stream
    assert stream.group is G.GL  # c2 maps the stream to itself: W' = P W P^-1, still GL
    _check_random_elements_keep_outputs(gm, report, x)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 1)
        self.c2 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.c2(torch.cumsum(self.c1(x), 1))


def test_unknown_op_gives_identity():
    gm, report, x = _analyze(Unknown())
    assert report.space("c1").group is G.IDENTITY
    assert report.space("cumsum").group is G.IDENTITY
    assert report.continuous_dimension == 0
    assert any("cumsum" in n for n in report.notes)


class Product(nn.Module):
    """z = conv_a(x) * conv_b(x) -> conv_c; the factors are monomial, z's scaling derived."""

    def __init__(self, act=None):
        super().__init__()
        self.a = nn.Conv2d(3, 5, 1)
        self.b = nn.Conv2d(3, 5, 3, padding=1)
        self.act = act
        self.c = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        z = self.a(x) * self.b(x)
        if self.act is not None:
            z = self.act(z)
        return self.c(z)


def test_product_monomial_with_derived_scaling():
    gm, report, x = _analyze(Product())
    a, b, z = report.space("a"), report.space("b"), report.space("mul")
    assert a.group is b.group is z.group is G.MONOMIAL
    assert z.derived and not a.derived and a.tie == b.tie == z.tie is not None
    assert report.continuous_dimension == 10  # D_a and D_b free, D_z = D_a D_b
    _check_random_elements_keep_outputs(gm, report, x)


def test_product_into_relu_keeps_factor_scalings_positive():
    gm, report, x = _analyze(Product(nn.ReLU()))
    assert report.space("mul").group is G.POSITIVE_MONOMIAL
    assert report.space("a").group is G.POSITIVE_MONOMIAL  # else D_a D_b could flip a sign under the ReLU
    _check_random_elements_keep_outputs(gm, report, x)


class Halves(nn.Module):
    """z = conv(x) cut in two halves, written in one of the ways models do, multiplied, conv."""

    def __init__(self, style):
        super().__init__()
        self.style = style
        self.a = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        z = self.a(x)
        if self.style == "chunk":
            p, q = z.chunk(2, dim=1)
        elif self.style == "split":
            p, q = torch.split(z, 4, dim=1)
        elif self.style == "tensor_split":
            p, q = torch.tensor_split(z, 2, dim=1)
        elif self.style == "narrow":
            p, q = z.narrow(1, 0, 4), z.narrow(1, 4, 4)
        elif self.style == "shape":
            p, q = z[:, :z.shape[1] // 2], z[:, z.shape[1] // 2:]
        else:  # the authors' C = x.size()[1]
            C = z.size()[1]
            p, q = z[:, :C // 2], z[:, C // 2:]
        return self.c(p * q)


@pytest.mark.parametrize("style", ["chunk", "split", "tensor_split", "narrow", "shape", "size"])
def test_product_halves_however_the_slice_is_written(style):
    gm, report, x = _analyze(Halves(style))
    segments = report.node_segments["a"]
    assert [(s, e) for s, e, _, _ in segments] == [(0, 4), (4, 8)]
    halves = [report.spaces[sid] for _, _, sid, _ in segments]
    product = report.space("mul")
    assert all(h.group is G.MONOMIAL and not h.derived for h in halves) and product.derived
    assert report.continuous_dimension == 8
    _check_random_elements_keep_outputs(gm, report, x)


class ResidualInPlace(Residual):
    def forward(self, x):
        a = self.c1(x)
        y = self.c2(a)
        y += a
        return self.c3(y)


def test_in_place_residual_add_is_one_space():
    gm, report, x = _analyze(ResidualInPlace())
    assert report.space("c1") is report.space("c2") is report.space("add")
    assert report.space("c1").group is G.GL
    _check_random_elements_keep_outputs(gm, report, x)


class ConstantChannels(nn.Module):
    """cat([y, stored constant]): the constant's channels cannot change basis."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1)
        self.c2 = nn.Conv2d(6, 3, 1)
        self.register_buffer("extra", torch.randn(1, 2, 1, 1))

    def forward(self, x):
        y = self.c1(x)
        return self.c2(torch.cat([y, self.extra.expand(y.shape[0], -1, *y.shape[2:])], dim=1))


def test_a_constant_concatenated_to_channels_stays_fixed():
    gm, report, x = _analyze(ConstantChannels())
    groups = [report.spaces[sid].group for _, _, sid, _ in report.node_segments["cat"]]
    assert groups == [G.GL, G.IDENTITY]
    _check_random_elements_keep_outputs(gm, report, x)


class SliceCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 3, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.c1(x)
        return self.c2(torch.cat([self.act(y[:, :3]), y[:, 3:]], dim=1))


def test_slices_and_cat_give_block_diagonal_spaces():
    gm, report, x = _analyze(SliceCat())
    segs = report.node_segments["c1"]
    assert [(s, e) for s, e, _, _ in segs] == [(0, 3), (3, 8)]
    groups = [report.spaces[sid].group for _, _, sid, _ in segs]
    assert groups == [G.POSITIVE_MONOMIAL, G.GL]
    assert report.spaces_of("cat") == report.spaces_of("c1")
    assert report.continuous_dimension == 3 + 25
    _check_random_elements_keep_outputs(gm, report, x)


class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.avg_pool2d(self.c1(x), 4), 1))


def test_flatten_of_spatial_map_is_copies_of_the_space():
    gm, report, x = _analyze(Flatten())
    space = report.space("c1")
    assert space.group is G.GL and space.size == 4
    assert report.node_segments["view"] == [(0, 16, space.id, 4)]  # torch.flatten arrives as aten.view
    _check_random_elements_keep_outputs(gm, report, x)


# ----------------------------------------------------------------------------------------- the zoo
def _zoo(name, **kwargs):
    m = randomize_batchnorm(create_model(name, **kwargs).eval(), 0)
    x = torch.randn(1, 3, 32, 32)
    gm = qlfx.compile(m, FOLD, example_inputs=(x,)).graph_module
    return gm, sym.analyze(gm)


def test_qlnet_tiny_pdeblock_groups():
    gm, report = _zoo("qlnet-tiny")
    assert report.space("maxpool").group is G.POSITIVE_MONOMIAL  # stage 1: ReLU + max-pool in the stem
    assert report.space("maxpool") is report.space("layer1_0_add")  # stage-1 residual stream
    for add in ("layer2_0_add", "layer3_0_add", "layer4_0_add"):  # stages 2-4: hardball
        assert report.space(add).group is G.O
    for half in ("layer1_0_slice", "layer1_0_slice_1", "layer4_0_slice", "layer4_0_slice_1"):
        s = report.space(half)
        assert s.group is G.MONOMIAL and not s.derived
    assert report.space("layer1_0_mul").derived
    assert report.space("layer1_0_conv2").group is G.MONOMIAL  # per-channel depthwise: tied to the product
    text = sym.format_report(report)
    assert "positive-monomial" in text and "continuous symmetry dimension" in text
    d = report.to_dict()
    assert d["continuous_dimension"] == report.continuous_dimension == sum(s["lie_dimension"] for s in d["spaces"])


def test_symbolic_batch_size_gives_the_same_analysis():
    """dynamic_batch: sizes are SymInt nodes (aten.sym_size), the head's view reads one, every channel
    slice first takes a batch slice x[0:INT64_MAX]."""
    model = randomize_batchnorm(create_model("qlnet-tiny").eval(), 0)
    x = torch.randn(2, 3, 32, 32)
    graphs = [qlfx.compile(model, FOLD, example_inputs=(x,), dynamic_batch=d, verify=False).graph_module
              for d in (False, True)]
    assert any(ir.is_op(n, torch.ops.aten.sym_size) for n in graphs[1].graph.nodes)
    static, dynamic = map(sym.analyze, graphs)
    assert dynamic.group_counts() == static.group_counts()
    assert dynamic.continuous_dimension == static.continuous_dimension
    assert not dynamic.notes


@pytest.mark.parametrize("name", ["qlnet-tiny", "qlnet-eq3-nows"])
def test_expanded_depthwise_convs_keep_the_analysis(name):
    """expand-depthwise: repeat_interleave(x, m, 1) (m copies of each channel) + a pure depthwise conv
    gives the same spaces and groups as the depthwise conv with multiplier m."""
    kwargs = {} if name.endswith("tiny") else dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)
    model = randomize_batchnorm(create_model(name, **kwargs).eval(), 0)
    x = torch.randn(1, 3, 32, 32)
    plain, expanded = (qlfx.compile(model, passes, example_inputs=(x,), verify=False).graph_module
                       for passes in (FOLD, FOLD + ",expand-depthwise"))
    assert any(ir.is_op(n, torch.ops.aten.repeat_interleave) for n in expanded.graph.nodes)
    r_plain, r_expanded = sym.analyze(plain), sym.analyze(expanded)
    assert r_expanded.group_counts() == r_plain.group_counts()
    assert r_expanded.continuous_dimension == r_plain.continuous_dimension
    _check_random_elements_keep_outputs(expanded, r_expanded, x, seeds=(0,))


def test_eq3_product_pins_stream_to_signed_permutations():
    """Paper Eq.(3) with two blocks a stage: every stream space is (signed) permutation, and the
    continuous symmetry is exactly the branch rescalings (one scaling per conv_a output channel)."""
    model = randomize_batchnorm(qlnet_eq3(num_classes=10, layers=(2, 2, 2, 2), widths=(8, 16, 32, 64)).eval(), 0)
    x = torch.randn(1, 3, 32, 32)
    gm = qlfx.compile(model, FOLD, example_inputs=(x,)).graph_module
    report = sym.analyze(gm)
    assert report.space("maxpool").group is G.PERMUTATION  # ReLU stem (positive) meets softball (O)
    for act in ("layer2_0_act", "layer3_0_act", "layer4_0_act"):
        assert report.space(act).group is G.SIGNED_PERMUTATION
    branch = [s for s in report.spaces if s.group is G.MONOMIAL and not s.derived]
    assert all("conv_a" in s.sites[0] for s in branch)
    assert report.continuous_dimension == sum(s.size for s in branch) == 4 * (8 + 8 + 8 + 16 + 16 + 32 + 32 + 64)  # k * C_in per block
    shared = [n for n, k in report.node_kinds.items() if k == "shared-depthwise"]
    assert len(shared) == 8  # the repeated 3x3 kernel was recognised in every block
    _check_random_elements_keep_outputs(gm, report, x, seeds=(0,))


def test_unfolded_graph_treats_batchnorm_as_per_channel():
    model = randomize_batchnorm(create_model("qlnet-tiny").eval(), 0)
    x = torch.randn(1, 3, 32, 32)
    gm = qlfx.trace(model, (x,))
    report = sym.analyze(gm)
    assert report.space("layer1_0_bn2").group is G.MONOMIAL
    assert report.space("layer1_0_bn2").tie == report.space("layer1_0_conv2").tie is not None
    _check_random_elements_keep_outputs(gm, report, x)


@pytest.mark.slow
def test_qlnet50_full_size_analysis():
    m = randomize_batchnorm(create_model("qlnet50").eval(), 0)
    gm = qlfx.compile(m, FOLD, example_inputs=(torch.randn(1, 3, 224, 224),), verify=False).graph_module
    report = sym.analyze(gm)
    assert report.space("maxpool").group is G.POSITIVE_MONOMIAL
    o_spaces = [s for s in report.spaces if s.group is G.O]
    assert sorted(s.size for s in o_spaces) == [128, 256, 512]
    # O(128) + O(256) + O(512) + 64 stem scalings + 2W for the halves and 2W for the depthwise output of
    # every block (W = 4C if C <= 128 else 2C)
    assert report.continuous_dimension == 8128 + 32640 + 130816 + 64 + 16384 + 16384 == 204_416
