"""factor (conv -> conv + identity 1x1: a GL space) and merge-pointwise (the inverse, where it pays)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qlfx
from blocks import one_torch_thread  # noqa: F401  (autouse fixture)
from passtools import rel_error
from qlfx import ir
from qlfx.models import randomize_batchnorm
from qlfx.debug import count_macs
from qlfx.requirements import BN_FOLDED
from qlfx.symmetry import analyze


class ReluStem(nn.Module):
    """A 5x5 stem (3 -> 24, rank-4 weight plus noise) -> BN -> ReLU -> 1x1 conv (24 -> 8) -> ReLU -> pool
    -> linear: the stem's output space is positive-monomial (no rotation) although its weight is nearly
    rank 4."""

    def __init__(self, noise=1e-3):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 24, 5, padding=2, stride=2)
        self.bn = nn.BatchNorm2d(24)
        self.proj = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            low = torch.randn(24, 4, generator=gen) @ torch.randn(4, 75, generator=gen) / 8
            self.stem.weight.copy_((low + noise * torch.randn(24, 75, generator=gen)).reshape(24, 3, 5, 5))
        randomize_batchnorm(self, seed=3)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        return self.fc(torch.relu(self.proj(h)).mean(dim=(2, 3)))


def _x(n=32, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _convs(gm):
    return [c for c in map(ir.ConvCall.of, gm.graph.nodes) if c is not None]


def test_factor_is_equivalent_and_makes_a_gl_space():
    model = ReluStem().eval()
    x = _x()
    c = qlfx.compile(model, "fold-bn,factor", example_inputs=(x[:4],), calibration=x)
    gm = c.graph_module
    row = c.report.rows[-1]
    assert row.changed and row.check.passed and len(row.result.rewrites) >= 1
    stem = _convs(gm)[0]
    assert stem.bias is None and tuple(ir.get_tensor(gm, stem.weight).shape) == (24, 3, 5, 5)
    pointwise = next(iter(stem.node.users))
    assert ir.ConvCall.of(pointwise).is_pointwise
    assert torch.equal(ir.get_tensor(gm, ir.ConvCall.of(pointwise).weight).flatten(1), torch.eye(24))
    groups = {analyze(gm).spaces[i].group.value for i in analyze(gm).spaces_of(stem.node.name)}
    assert groups == {"GL"}, groups
    with torch.no_grad():
        assert rel_error(model(x), gm(x)) <= 1e-5


def test_factor_before_fold_bn_names_fold_bn_and_auto_prereqs_runs_it():
    """A BN after the conv pins its channel space until folded: factor skips it and says fold-bn would
    decide; with auto_prereqs the stem is factored as after an explicit fold-bn."""
    model = ReluStem().eval()
    x = _x()
    alone = qlfx.compile(model, "factor", example_inputs=(x[:4],)).report.rows[-1].result
    (skip,) = [s for s in alone.skipped if s.site == "stem"]
    assert skip.needs is BN_FOLDED and "run fold-bn first" in str(skip)
    assert not any(r.startswith("stem:") for r in alone.rewrites)  # the rest it still does (proj)
    assert "factor needs fold-bn first (1 conv is blocked by a BN)" in alone.notes
    auto = qlfx.compile(model, "factor", example_inputs=(x[:4],), auto_prereqs=True)
    assert [p.name for p in auto.passes] == ["fold-bn", "factor"]
    assert any(r.startswith("stem:") for r in auto.report.rows[-1].result.rewrites)


def test_merge_pointwise_multiplies_the_convs_back():
    model = ReluStem().eval()
    x = _x()
    c = qlfx.compile(model, "fold-bn,factor,merge-pointwise", example_inputs=(x[:4],), calibration=x)
    gm = c.graph_module
    assert len(_convs(gm)) == 2 and c.report.rows[-1].changed and c.report.rows[-1].check.passed
    with torch.no_grad():
        assert rel_error(model(x), gm(x)) <= 1e-5


class Bottleneck(nn.Module):
    """3x3 conv (stride 2, padding 1, bias) -> 1x1 conv (bias), nothing between: a linear bottleneck."""

    def __init__(self, inner):
        super().__init__()
        gen = torch.Generator().manual_seed(inner)
        self.a = nn.Conv2d(3, inner, 3, stride=2, padding=1)
        self.b = nn.Conv2d(inner, 16, 1)
        with torch.no_grad():
            for conv in (self.a, self.b):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))

    def forward(self, x):
        return self.b(self.a(x))


def test_merge_pointwise_math_with_padding_stride_and_both_biases():
    # 12 inner channels: 12 * (27 + 16) = 516 MACs/pixel > 16 * 27 = 432 merged -> merge
    model = Bottleneck(12).eval()
    x = _x()
    c = qlfx.compile(model, "merge-pointwise", example_inputs=(x[:4],))
    gm = c.graph_module
    assert len(_convs(gm)) == 1 and tuple(ir.get_tensor(gm, _convs(gm)[0].weight).shape) == (16, 3, 3, 3)
    with torch.no_grad():
        assert rel_error(model(x), gm(x)) <= 1e-5
    # 4 inner channels: 4 * 43 = 172 < 432 -> the factored form is cheaper and stays
    cheap = qlfx.compile(Bottleneck(4).eval(), "merge-pointwise", example_inputs=(x[:4],))
    assert len(_convs(cheap.graph_module)) == 2 and "cheaper" in str(cheap.report.rows[-1].result.skipped[0])


def test_slice_after_factor_shrinks_a_low_rank_stem_that_plain_slice_cannot():
    model = ReluStem().eval()
    x = _x(256)
    common = dict(example_inputs=(x[:8],), calibration=x, verify_inputs=0)
    plain = qlfx.compile(model, "fold-bn,slice<budget=0.01;random_inputs=0>", **common)
    factored = qlfx.compile(model, "fold-bn,factor,slice<budget=0.01;random_inputs=0>,merge-pointwise", **common)
    base = count_macs(qlfx.compile(model, "fold-bn", example_inputs=(x[:8],)).graph_module)
    stem = _convs(factored.graph_module)[0]
    inner = ir.get_tensor(factored.graph_module, stem.weight).shape[0]
    assert inner <= 6, inner  # the principal subspace of a rank-4 (+ noise) stem
    assert count_macs(factored.graph_module) < 0.6 * base
    assert count_macs(factored.graph_module) < count_macs(plain.graph_module)
    with torch.no_grad():
        assert rel_error(model(x), factored.graph_module(x)) <= 0.01


@pytest.mark.parametrize("share", [0.0, 1.1])
def test_factor_min_share_selects_convs(share):
    model = ReluStem().eval()
    x = _x()
    c = qlfx.compile(model, f"fold-bn,factor<min_share={share}>", example_inputs=(x[:4],))
    changed = c.report.rows[-1].changed
    assert changed == (share == 0.0)


@pytest.mark.parametrize("name", ["qlnet-tiny", "qlnet-eq3-tiny"])
def test_factor_then_merge_on_zoo_layouts_with_random_bn(name):
    from qlfx.models import create_model, default_input_shape

    model = randomize_batchnorm(create_model(name).eval(), 5)
    shape = (2, *default_input_shape(name)[1:])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    c = qlfx.compile(model, "fold-bn,factor<min_share=0;all=true>,merge-pointwise", example_inputs=(x,))
    factor_row, merge_row = c.report.rows[-2], c.report.rows[-1]
    assert factor_row.changed and factor_row.check.passed and merge_row.check.passed
    # nothing was sliced, so every split costs more than the conv it came from and is merged back
    assert len(merge_row.result.rewrites) == len(factor_row.result.rewrites)
    with torch.no_grad():
        assert rel_error(model(x), c.graph_module(x)) <= 1e-5
