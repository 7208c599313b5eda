"""Radial activations recognised from their structure, however they are written.

A value y = x * g(|x|) (or x / g(|x|), where(|x| > r, r x / |x|, x), clamp forms), with |x| the norm of x
over the channel axis at each pixel, is O(C)-equivariant: the analysis must put x's space in O(C) for
every way of writing it (inside a small residual net, so a whole stream depends on it), and a random
element must keep the outputs. Forms that are NOT invariant (a norm over pixels, a weighted or partial
sum, the norm of another tensor, a max over channels, ...) must not give O(C). Then the authors' style
of writing a QLNet (tests/authors_resnet.py) must get exactly the groups of the zoo's qlnet50.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qlfx
from qlfx import ir
from qlfx import symmetry as sym
from qlfx.models import Hardball, Softball, qlnet, qlnet50, randomize_batchnorm
from qlfx.passes.basis_change import BasisChange
from qlfx.symmetry import Group as G
from authors_resnet import HardBall, SoftBall, authors_resnet
from blocks import one_torch_thread  # noqa: F401  (autouse fixture)
from passtools import rel_error, run_pass

FOLD = "fold-bn,constant-fold,dce"
C = 8  # stream width of the small nets
R2 = 4.0
R = np.sqrt(R2)  # a numpy float64, as the authors write their radius


# ----------------------------------------------------------------------------------- the forms
def authors_hardball(x):
    norm = torch.sqrt((x * x).sum(1, keepdim=True))
    return torch.where(norm > R, R * x / norm, x)


def authors_softball(x):
    return x / torch.sqrt(1 + (x * x).sum(1, keepdim=True) / R2)


def in_place(x):
    y = x.clone()
    y /= 1 + x.norm(dim=1, keepdim=True)
    return y


def where_on_the_factor(x):
    n = x.norm(dim=1, keepdim=True)
    return x * torch.where(n > R, R / n, torch.ones_like(n))


def minimum_with_ones(x):
    n = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x * torch.minimum(R / n, torch.ones_like(n))


def smooth_tanh(x):
    n = torch.sqrt((x ** 2).sum(dim=1, keepdim=True) + 1e-12)
    return x * torch.tanh(n) / n


POSITIVE = {
    "authors hardball: where(sqrt(sum x*x) > r, r*x/n, x), numpy r": authors_hardball,
    "authors softball: x / sqrt(1 + sum(x*x)/r^2)": authors_softball,
    "x * clamp(r / x.norm(dim=1), max=1)": lambda x: x * torch.clamp(R / x.norm(dim=1, keepdim=True), max=1),
    "x * (r / clamp(vector_norm, min=r))":
        lambda x: x * (R / torch.clamp(torch.linalg.vector_norm(x, dim=1, keepdim=True), min=R)),
    "F.normalize(x, dim=1) * min(|x|, r)":
        lambda x: F.normalize(x, dim=1) * torch.clamp(x.norm(dim=1, keepdim=True), max=R),
    "keepdim-free sqrt(x.pow(2).sum(1) + eps), unsqueeze":
        lambda x: x * torch.clamp(R / torch.sqrt(x.pow(2).sum(1) + 1e-6), max=1).unsqueeze(1),
    "keepdim-free torch.norm, [:, None]": lambda x: x / (1 + torch.norm(x, dim=1))[:, None],
    "rsqrt(1 + mean over channels of x**2)": lambda x: x * torch.rsqrt(1 + (x ** 2).mean(1, keepdim=True)),
    "square(x).sum + eps inside the sqrt, clamp_min, division":
        lambda x: R * x / torch.sqrt(torch.square(x).sum(dim=1, keepdim=True) + 1e-12).clamp(min=R),
    "torch.linalg.norm": lambda x: x / (1 + torch.linalg.norm(x, dim=1, keepdim=True)),
    "where(|x| <= r, x, x * (r / |x|))":
        lambda x: torch.where(x.norm(dim=1, keepdim=True) <= R, x, x * (R / x.norm(dim=1, keepdim=True))),
    "where(|x| > r, 0, x) (a number branch)": lambda x: torch.where(x.norm(dim=1, keepdim=True) > 2 * R, 0.0, x),
    "x * where(n > r, r / n, ones_like(n))": where_on_the_factor,
    "x * minimum(r / n, ones_like(n))": minimum_with_ones,
    "x * tanh(n) / n with n = sqrt(sum x**2 + eps)": smooth_tanh,
    "x * exp(-|x|^2 / r^2)": lambda x: x * torch.exp(-(x * x).sum(1, keepdim=True) / R2),
    "in place: y = x.clone(); y /= 1 + |x|": in_place,
    "x / (1 + |x|).expand_as(x)": lambda x: x / (1 + x.norm(dim=1, keepdim=True)).expand_as(x),
    "norm over channels and pixels (per sample)":
        lambda x: x / (1 + torch.linalg.vector_norm(x, dim=(1, 2, 3), keepdim=True)),
    "einsum('nchw,nchw->nhw', x, x)": lambda x: x / (1 + torch.einsum("nchw,nchw->nhw", x, x)).unsqueeze(1),
    "x.square().mean(1).add(1).sqrt() (methods)": lambda x: x / x.square().mean(dim=1, keepdim=True).add(1).sqrt(),
    "sum(x*x) ** 0.5, softplus": lambda x: x * F.softplus(R - ((x * x).sum(1, keepdim=True) ** 0.5)),
    "F.normalize(x, dim=1) * r (onto the sphere)": lambda x: F.normalize(x, p=2.0, dim=1) * R,
    "qlfx Hardball (custom op)": Hardball(radius=float(R)),
    "qlfx Softball (custom op)": Softball(radius=float(R)),
}


class OtherNorm(nn.Module):
    """x * g(|z|) with z = conv(x) another tensor: g(|z|) is invariant under z's rotations, not x's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return x * torch.clamp(R / self.conv(x).norm(dim=1, keepdim=True), max=1)


class WeightedSquares(nn.Module):
    """x / sqrt(1 + sum_c w_c x_c^2): a per-channel weighted sum of squares is not O-invariant."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(1, C, 1, 1) + 0.5)

    def forward(self, x):
        return x / torch.sqrt(1 + (self.w * x * x).sum(1, keepdim=True))


class GainTimesNorm(nn.Module):
    """x / (1 + w * |x|): the factor differs between channels."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(1, C, 1, 1) + 0.5)

    def forward(self, x):
        return x / (1 + self.w * x.norm(dim=1, keepdim=True))


# form -> the groups of the stream's segments (the stream is not O(C) in any of them)
NEGATIVE = {
    "norm over dim 2": (lambda x: x / (1 + x.norm(dim=2, keepdim=True)), [G.IDENTITY]),
    "norm over pixels (2, 3)": (lambda x: x / (1 + torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True)), [G.IDENTITY]),
    "norm over the batch": (lambda x: x / (1 + x.norm(dim=0, keepdim=True)), [G.IDENTITY]),
    "per-channel weighted sum of squares": (WeightedSquares(), [G.PERMUTATION]),
    "per-channel gain times the norm": (GainTimesNorm(), [G.IDENTITY]),
    "x * g(|z|), z another tensor": (OtherNorm(), [G.GL]),
    "norm of part of the channels": (lambda x: x * torch.clamp(R / x[:, :C // 2].norm(dim=1, keepdim=True), max=1),
                                     [G.O, G.GL]),
    "abs max over channels": (lambda x: x / (1 + x.abs().amax(1, keepdim=True)), [G.PERMUTATION]),
    "L1 norm over channels": (lambda x: x / (1 + x.norm(p=1, dim=1, keepdim=True)), [G.SIGNED_PERMUTATION]),
    "sum over channels (not squared)": (lambda x: x / (1 + x.sum(1, keepdim=True).abs()), [G.PERMUTATION]),
    "einsum over pixels": (lambda x: x / (1 + torch.einsum("nchw,nchw->nc", x, x)[:, :, None, None]), [G.IDENTITY]),
    "where with a per-channel condition":
        (lambda x: torch.where(x > 1, x / x.norm(dim=1, keepdim=True), x), [G.PERMUTATION]),
}


# ------------------------------------------------------------------------------------ the net
class Form(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class ResidualStream(nn.Module):
    """stem conv+BN -> act, then two blocks s = act(s + conv3x3+BN(relu(conv1x1+BN(s)))), pooled head.
    The stem's output, every block's output and every act's output are one channel space."""

    def __init__(self, act: nn.Module, blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(C, 2 * C, 1, bias=False), nn.BatchNorm2d(2 * C), nn.ReLU(),
                          nn.Conv2d(2 * C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
            for _ in range(blocks))
        self.act = act if isinstance(act, nn.Module) else Form(act)
        self.head = nn.Linear(C, 5)

    def forward(self, x):
        s = self.act(self.stem(x))
        for block in self.blocks:
            s = self.act(s + block(s))
        return self.head(s.mean((2, 3)))


def _compiled(act, seed: int = 0):
    """The BN-folded float64 graph of a ResidualStream (random weights, random BN statistics)."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(ResidualStream(copy.deepcopy(act)).eval(), seed).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return qlfx.compile(model, FOLD, example_inputs=(x,), verify=False).graph_module, x


def _stem(gm) -> torch.fx.Node:
    """The first conv of the graph: the stem."""
    return next(n for n in gm.graph.nodes if ir.ConvCall.of(n) is not None)


def _outputs_kept(gm, new, x) -> float:
    with torch.no_grad():
        return rel_error(gm(x), new(x))


# ----------------------------------------------------------------------------------- positives
@pytest.mark.parametrize("form", sorted(POSITIVE))
def test_radial_form_puts_the_stream_in_O(form):
    gm, x = _compiled(POSITIVE[form])
    report = sym.analyze(gm)
    stem = _stem(gm)
    stream = report.space(stem.name)
    assert stream.group is G.O and stream.size == C, sym.format_report(report)
    assert report.space("head").group is G.IDENTITY

    new, result = run_pass(BasisChange(seed=1), gm, x)  # a random element of every space
    assert any(r.startswith(f"space {stream.id} (O") for r in result.rewrites)
    assert _outputs_kept(gm, new, x) <= 1e-10

    # one rotation of the stream alone: the stem's weight becomes Q W, and the outputs stay ...
    q = sym.random_orthogonal(C, torch.Generator().manual_seed(2))
    rotated = copy.deepcopy(gm)
    sym.apply_element(rotated, stream, q, report)
    w_old = ir.get_tensor(gm, ir.ConvCall.of(stem).weight)
    w_new = ir.get_tensor(rotated, ir.ConvCall.of(_stem(rotated)).weight)
    assert torch.allclose(w_new, torch.einsum("oa,ai...->oi...", q, w_old), atol=1e-12)
    assert _outputs_kept(gm, rotated, x) <= 1e-10
    # ... while a general invertible matrix (not in O) changes them: the form is really nonlinear
    gl = sym.random_element(G.GL, torch.Generator().manual_seed(3), size=C, sigma=0.5)
    forced = copy.deepcopy(gm)
    sym.apply_element(forced, stream, gl, report, check=False)
    assert _outputs_kept(gm, forced, x) > 1e-3


def test_the_norm_is_reported_as_an_invariant_and_the_squares_have_no_space():
    gm, _ = _compiled(authors_hardball)
    report = sym.analyze(gm)
    kinds = report.node_kinds
    sums = [n for n in gm.graph.nodes if ir.is_op(n, torch.ops.aten.sum)]
    assert sums and all(kinds[n.name] == "invariant" for n in sums)
    squares = [n for n in gm.graph.nodes if n.name in kinds and kinds[n.name] == "square"]
    assert squares and all(n.name not in report.node_segments for n in squares)  # x*x is no channel value
    assert any("sum of squares over channels" in d for s in report.spaces for d in s.demands)
    assert report.continuous_dimension == C * (C - 1) // 2 + 2 * (2 * C)  # O(8) + two ReLU spaces


# ----------------------------------------------------------------------------------- negatives
@pytest.mark.parametrize("form", sorted(NEGATIVE))
def test_a_form_that_is_not_invariant_does_not_give_O(form):
    act, expected = NEGATIVE[form]
    gm, x = _compiled(act)
    report = sym.analyze(gm)
    segments = report.node_segments[_stem(gm).name]
    groups = [report.spaces[sid].group for _, _, sid, _ in segments]
    assert groups == expected, sym.format_report(report)
    assert not any(g is G.O and stop - start == C for (start, stop, _, _), g in zip(segments, groups))
    new, _ = run_pass(BasisChange(seed=1), gm, x)  # whatever the analysis allows keeps the outputs
    assert _outputs_kept(gm, new, x) <= 1e-10


def test_the_other_tensor_gets_the_rotation_instead():
    """x * g(|conv(x)|): the conv's output space is the one that may rotate."""
    gm, _ = _compiled(OtherNorm())
    report = sym.analyze(gm)
    inner = [n for n in gm.graph.nodes if ir.module_path(n) == "act.conv"]
    assert len(inner) == 3 and all(report.space(n.name).group is G.O for n in inner)  # one per call of act


# --------------------------------------------------------------------------- the authors' model
@pytest.fixture(scope="module")
def full_size():
    """The authors-style model at full widths, BN folded, random weights and BN statistics (the analysis
    only needs a small image; the widths make the numbers)."""
    x = torch.randn(1, 3, 32, 32)
    model = randomize_batchnorm(authors_resnet().eval(), 0)
    return qlfx.compile(model, FOLD, example_inputs=(x,), verify=False).graph_module, x


def test_authors_model_gets_the_groups_of_qlnet50(full_size):
    """qlnet50 (test_analysis.py: the same numbers for the zoo's model): the streams of stages 2-4 O(C),
    stage 1 positive-monomial, in each of the 16 blocks two monomial product halves, the derived product
    and the monomial depthwise output."""
    report = sym.analyze(full_size[0])
    assert report.continuous_dimension == 204_416
    assert report.group_counts() == {"identity": 2, "positive-monomial": 1, "monomial": 16 * 4, "O": 3}
    assert sorted(s.size for s in report.spaces if s.group is G.O) == [128, 256, 512]
    assert report.space("maxpool").group is G.POSITIVE_MONOMIAL
    assert not report.notes


def test_authors_model_is_qlnet50_with_the_same_weights():
    """Same state-dict keys and shapes, same function (eager, no qlfx involved)."""
    zoo = randomize_batchnorm(qlnet50().eval(), 1)
    authors = authors_resnet().eval()
    authors.load_state_dict(zoo.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_error(zoo(x), authors(x)) <= 1e-5


def test_basis_change_rotates_every_conv_weight_of_the_O_streams(full_size):
    """The issue: with a hand-written hardball basis-change moved only 16% of the weights (the streams
    were left fixed). A random element of the O spaces must now change every weight reading or writing
    them, entry by entry, and keep the outputs."""
    gm, x = full_size
    report = sym.analyze(gm)
    o_spaces = {s.id for s in report.spaces if s.group is G.O}
    new, _ = run_pass(BasisChange(seed=4, spaces=",".join(map(str, sorted(o_spaces)))), gm, x)
    new_nodes = {n.name: n for n in new.graph.nodes}
    touching, changed, total = 0, 0, 0
    for node in gm.graph.nodes:
        view = ir.ConvCall.of(node) or ir.LinearCall.of(node)
        if view is None or not (set(report.spaces_of(node.name)) | set(report.spaces_of(view.input.name))) & o_spaces:
            continue
        touching += 1
        new_view = ir.ConvCall.of(new_nodes[node.name]) or ir.LinearCall.of(new_nodes[node.name])
        w_old, w_new = ir.get_tensor(gm, view.weight), ir.get_tensor(new, new_view.weight)
        changed += int((w_old != w_new).sum())
        total += w_old.numel()
    # writers: the 13 conv3 and 3 skip convs of stages 2-4; readers: their conv1 but the first (it reads
    # stage 1) and the fc
    assert touching == 13 + 3 + 12 + 1
    assert changed >= 0.99 * total, f"only {changed / total:.1%} of the O-stream weights changed"
    with torch.no_grad():
        assert rel_error(gm(x), new(x)) <= 1e-4


@pytest.mark.parametrize("act", [HardBall, SoftBall])
def test_tiny_authors_model_matches_the_tiny_zoo_model(act):
    """Tiny widths, both hand-written radial activations, also captured with a symbolic batch size
    (then every channel slice reads a batch slice ``x[0:INT64_MAX]`` first)."""
    x = torch.randn(2, 3, 32, 32)
    zoo = qlfx.compile(randomize_batchnorm(qlnet((1, 1, 1, 1), 10, (8, 16, 32, 64)).eval(), 0), FOLD,
                       example_inputs=(x,), verify=False).graph_module
    expected = sym.analyze(zoo)
    model = randomize_batchnorm(authors_resnet((1, 1, 1, 1), 10, (8, 16, 32, 64), act).eval(), 0)
    for dynamic in (False, True):
        gm = qlfx.compile(model, FOLD, example_inputs=(x,), dynamic_batch=dynamic, verify=False).graph_module
        report = sym.analyze(gm)
        assert report.continuous_dimension == expected.continuous_dimension
        assert report.group_counts() == expected.group_counts()
        assert [s.size for s in report.spaces if s.group is G.O] == [16, 32, 64]
        new, _ = run_pass(BasisChange(seed=3), gm, x)
        with torch.no_grad():
            assert rel_error(model(x), new(x)) <= 1e-5
