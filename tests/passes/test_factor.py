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


def test_slice_prices_a_split_at_its_merged_cost():
    """slice's cost model (qlfx.symmetry.slice_cost) counts a conv + pointwise pair at what it costs after
    merge-pointwise: min(k (C_in K^2 + C_out), C_out C_in K^2) per pixel for k inner channels. Measured
    on the passes themselves: slice to k inner channels, merge-pointwise, count_macs."""
    from qlfx.symmetry.slice_cost import CostModel
    from qlfx.symmetry.slicing import Unit

    model = Bottleneck(12).eval()
    x = _x()
    gm = qlfx.trace(model, (x[:4],))
    first, second = (c.node for c in _convs(gm))
    unit = Unit(0, [], 12)
    unit.writers, unit.readers, unit.base_of = [first], [second], {first.name: torch.arange(12)}
    cost = CostModel(gm, [unit], batch=4)
    pixels = 4 * 8 * 8
    sid = analyze(gm).spaces_of(first.name)[0]
    for k in (3, 10, 11):  # break-even r* = 16 * 27 / (27 + 16) = 10.05
        assert cost.macs({0: k}) == pytest.approx(min(k * (27 + 16), 16 * 27) * pixels)
        assert cost.wasted(unit, {0: k}) == (k > 10)
        c = qlfx.compile(model, f"slice<keep={sid}:{k};method=magnitude;budget=1e30;random_inputs=0>,merge-pointwise",
                         example_inputs=(x[:4],), calibration=x, verify_inputs=0)
        assert count_macs(c.graph_module) == pytest.approx(cost.macs({0: k}))
    # moves above r* save nothing, but the search credits them with the average saving on the way down
    assert cost.saving(unit, 12, 11) == 0
    assert cost.rank_saving(unit, 12, 11, floor=1) == pytest.approx((16 * 27 - 43) * pixels / 11)


@pytest.mark.parametrize("noise", [1e-3, 1.0])
def test_factor_slice_merge_predicts_its_macs_and_leaves_no_wasted_split(noise):
    """Low-rank stem (noise 1e-3): the split is sliced below its break-even width and stays. Full-rank
    stem (noise 1): what slice cut of it would be merged back, so slice gives those directions back
    (they only cost error) or never cuts them. Either way the MACs slice predicts are what the graph
    needs after merge-pointwise, and no more than before factor."""
    model = ReluStem(noise=noise).eval()
    x = _x(256)
    c = qlfx.compile(model, "fold-bn,factor<energy=1>,slice<budget=0.02;random_inputs=0>,merge-pointwise",
                     example_inputs=(x[:8],), calibration=x, verify_inputs=0)  # energy=1: split even full rank
    stats = next(r.result.stats for r in c.report.rows if r.pass_name == "slice")
    base = count_macs(qlfx.compile(model, "fold-bn", example_inputs=(x[:8],)).graph_module)
    assert count_macs(c.graph_module) == pytest.approx(stats["macs_predicted"])
    assert count_macs(c.graph_module) <= base
    # every split merge-pointwise multiplies back has the width factor gave it: slice spent nothing on it
    widths = {r.split(":")[0]: int(r.split("conv to ")[1].split(" ")[0]) for r in c.report.rows[-3].result.rewrites}
    for merged in c.report.rows[-1].result.rewrites:
        second = merged.split(" + ")[1].split(":")[0]
        assert int(merged.split(": ")[1].split(" inner")[0]) == widths[second], merged
    if noise < 0.01:  # the low-rank stem's split pays and stays
        assert not any(r.startswith("stem_conv2d + stem") for r in c.report.rows[-1].result.rewrites)
    with torch.no_grad():
        assert rel_error(model(x), c.graph_module(x)) <= 0.02


def test_factor_with_calibration_splits_only_what_is_low_rank_there():
    """With calibration data a conv is split only if at most ``energy`` of its bias-free output energy lies
    beyond floor(3 r* / 4) principal directions: the rank-4 stem yes, a full-rank one not (said why);
    without calibration data, or with energy=1, both."""
    x = _x(128)
    for noise, split in ((1e-3, True), (1.0, False)):
        model = ReluStem(noise=noise).eval()
        c = qlfx.compile(model, "fold-bn,factor", example_inputs=(x[:8],), calibration=x)
        result = c.report.rows[-1].result
        assert any(r.startswith("stem:") for r in result.rewrites) == split
        if not split:
            (skip,) = [s for s in result.skipped if s.site == "stem"]
            width = int(0.75 * 24 * 75 / (75 + 24))  # 3/4 of r* for the 24 x 3 x 5 x 5 stem
            assert "not low-rank on the calibration data" in skip.reason and f"beyond {width} principal" in skip.reason
        for pipeline, kw in (("fold-bn,factor", {}), ("fold-bn,factor<energy=1>", {"calibration": x})):
            rewrites = qlfx.compile(model, pipeline, example_inputs=(x[:8],), **kw).report.rows[-1].result.rewrites
            assert any(r.startswith("stem:") for r in rewrites)
    with pytest.raises(qlfx.UsageError, match="energy"):
        qlfx.compile(ReluStem().eval(), "fold-bn,factor<energy=-1>", example_inputs=(x[:8],))
