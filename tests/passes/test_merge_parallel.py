"""merge-parallel: summed parallel conv branches on one input become one conv.

Each reparameterisable block in tests/blocks.py has its own ``reparameterize()`` (written the way the
RepVGG authors do it, independent of the pass): the merged graph must hold *that* conv (weights and
bias) and compute the same outputs, with exactly one conv per block. timm's own RepVGG, MobileOne and
FastViT must come out with no more convs than timm's deploy form.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import qlfx
from blocks import (ACBlock, ConvBN, ConvNet, MobileOneBlock, NestedBranches, RepMixer, RepVGGBlock,
                    UncentredParallel, count_convs, randomize)
from blocks import one_torch_thread  # noqa: F401  (autouse fixture)
from qlfx import ir
from qlfx.models import randomize_batchnorm
from qlfx.pass_manager import PassContext, get_pass

PIPELINES = ["fold-bn,merge-parallel,dce", "merge-parallel,dce"]  # the second folds branch BNs locally

CASES = {
    "repvgg-identity": (lambda: RepVGGBlock(4, 4), (2, 4, 8, 8)),
    "repvgg-stride2-widen": (lambda: RepVGGBlock(4, 6, stride=2), (1, 4, 9, 9)),
    "repvgg-grouped": (lambda: RepVGGBlock(4, 4, groups=2), (1, 4, 7, 7)),
    "mobileone-depthwise": (lambda: MobileOneBlock(6, branches=3), (1, 6, 7, 7)),
    "mobileone-dense": (lambda: MobileOneBlock(5, branches=2, depthwise=False), (1, 5, 6, 6)),
    "acnet-asymmetric": (lambda: ACBlock(3, 5, stride=2), (1, 3, 9, 9)),
    "uncentred-1x1": (lambda: UncentredParallel(4), (1, 4, 6, 6)),
    "fastvit-repmixer": (lambda: RepMixer(6), (2, 6, 7, 7)),
    "nested-signed-scaled": (lambda: NestedBranches(4), (1, 4, 6, 5)),
}


def _merge_row(compiled):
    return next(r for r in compiled.report.rows if r.pass_name == "merge-parallel")


def _single_conv(gm) -> tuple[torch.Tensor, torch.Tensor, ir.ConvCall]:
    convs = [ir.ConvCall.of(n) for n in gm.graph.nodes if ir.ConvCall.of(n) is not None]
    assert len(convs) == 1, f"expected one conv, got {[c.node.name for c in convs]}"
    c = convs[0]
    return ir.get_tensor(gm, c.weight), ir.get_tensor(gm, c.bias), c


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("case", list(CASES))
def test_block_merges_to_its_own_reparameterisation(case, pipeline):
    make, shape = CASES[case]
    block = randomize(make(), seed=7)
    x = torch.randn(shape)
    compiled = qlfx.compile(block, pipeline, (x,))
    gm = compiled.graph_module
    assert not any(ir.is_op(n, ir.BATCH_NORM) for n in gm.graph.nodes)
    weight, bias, conv = _single_conv(gm)
    reference = block.reparameterize()
    torch.testing.assert_close(weight, reference.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bias, reference.bias, atol=1e-6, rtol=1e-5)
    assert conv.stride == reference.stride and conv.groups == reference.groups
    assert tuple(conv.padding) == tuple(reference.padding)
    with torch.no_grad():
        act = getattr(block, "act", nn.Identity())
        deployed = act(reference(x))
        torch.testing.assert_close(compiled(x), deployed, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-4)


def test_repvgg_net_has_one_conv_per_block():
    spec = [("repvgg", 8, 1, "relu"), ("repvgg", 12, 2, "relu"), ("repvgg", 12, 1, "relu"),
            ("repvgg_grouped", 12, 1, "relu"), ("mobileone", 12, 1, "relu"), ("acblock", 8, 2, "relu")]
    net = randomize(ConvNet(spec, stem=8), seed=3)
    x = torch.randn(2, 3, 16, 16)
    compiled = qlfx.compile(net, "fold-bn,merge-parallel,constant-fold,dce", (x,))
    # stem conv + one per block (the mobileone block at index 4 has no pre-conv: widths match)
    assert count_convs(compiled.graph_module) == 1 + len(spec)
    torch.testing.assert_close(compiled(x), net(x), atol=1e-5, rtol=1e-4)


def test_bottleneck_is_left_alone():
    """Shortcut and residual branch read different tensors: no two branches on one input."""
    from blocks import Bottleneck

    block = randomize(Bottleneck(6, 8, stride=2), seed=1)
    x = torch.randn(1, 6, 8, 8)
    before = count_convs(qlfx.trace(block, (x,)))
    compiled = qlfx.compile(block, "fold-bn,merge-parallel,dce", (x,))
    assert count_convs(compiled.graph_module) == before
    row = compiled.report.rows[2]
    assert row.pass_name == "merge-parallel"
    # a plain residual add is not a parallel-branch sum: nothing changed and no noise in the report
    assert not row.changed and not row.result.skipped


class _Pair(nn.Module):
    def __init__(self, a, b, reuse_a=False):
        super().__init__()
        self.a, self.b, self.reuse_a = a, b, reuse_a

    def forward(self, x):
        y = self.a(x)
        out = y + self.b(x)
        return out * y.mean() if self.reuse_a else out


@pytest.mark.parametrize("a,b,reuse,reason", [
    (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2), False, "different dilations"),
    (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=2), False, "different groups"),
    (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), True, "also used outside the sum"),
])
def test_refusals_are_reported_and_equivalent(a, b, reuse, reason):
    model = randomize(_Pair(a, b, reuse), seed=2)
    x = torch.randn(1, 4, 6, 6)
    compiled = qlfx.compile(model, "merge-parallel", (x,))
    result = compiled.report.rows[-1].result
    assert not result.changed
    assert any(reason in s.reason for s in result.skipped), [str(s) for s in result.skipped]
    torch.testing.assert_close(compiled(x), model(x))


def test_partial_sum_keeps_other_terms():
    """conv3x3(x) + conv1x1(x) + conv(z): the two on x merge, the one on z stays a separate term."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = ConvBN(4, 4, 1, act="relu")
            self.a, self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            z = self.pre(x)
            return self.a(x) + self.c(z) + self.b(x)

    model = randomize(M(), seed=4)
    x = torch.randn(1, 4, 5, 5)
    compiled = qlfx.compile(model, "fold-bn,merge-parallel,dce", (x,))
    assert count_convs(compiled.graph_module) == 3  # pre, merged(a+b), c
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)


def test_rewrite_limit_zero_changes_nothing():
    block = randomize(RepVGGBlock(4, 4), seed=5)
    x = torch.randn(1, 4, 6, 6)
    gm = qlfx.trace(block, (x,))
    ctx = PassContext(example_inputs=(x,), rewrite_limit=0)
    result = get_pass("merge-parallel").run(gm, ctx)
    assert not result.changed and any("rewrite limit" in s.reason for s in result.skipped)


def test_float64_model():
    block = randomize(RepVGGBlock(3, 3), seed=6).double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    compiled = qlfx.compile(block, "merge-parallel,dce", (x,))
    weight, _, _ = _single_conv(compiled.graph_module)
    assert weight.dtype == torch.float64
    torch.testing.assert_close(compiled(x), block(x), atol=1e-12, rtol=1e-10)


def test_report_counts_sites_and_remaining_convs():
    spec = [("repvgg", 8, 1, "relu"), ("mobileone", 8, 1, "relu"), ("bottleneck", 8, 1, "relu")]
    net = randomize(ConvNet(spec, stem=8), seed=8)
    x = torch.randn(1, 3, 10, 10)
    before = count_convs(qlfx.trace(net, (x,)))
    compiled = qlfx.compile(net, "fold-bn,merge-parallel,dce", (x,))
    result = _merge_row(compiled).result
    remaining = count_convs(compiled.graph_module)
    # repvgg: 3x3 + 1x1 + BN identity; mobileone: two 3x3 + 1x1 + BN identity
    assert result.stats == {"sites": 2, "branches": 3 + 4, "convs_before": before, "convs": remaining}
    assert remaining == before - 1 - 2
    assert f"merged 2 site(s) of 7 parallel branches; {remaining} conv(s) remain (from {before})" in result.notes
    assert len(result.rewrites) == 2


class ScaledSum(nn.Module):
    """gamma * (a(x) + c(z) + b(x)) + pos + 0.5: a and b merge; c(z) (another input) stays a term and keeps
    its per-channel scale; the positional map (not per-channel) stays a term; 0.5 joins the merged bias."""

    def __init__(self, c=4, size=5):
        super().__init__()
        self.pre = ConvBN(c, c, 1, act="relu")
        self.a, self.b, self.c = ConvBN(c, c, 3), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(-1.0, 2.0, c).view(1, c, 1, 1))
        self.pos = nn.Parameter(torch.linspace(-1.0, 1.0, c * size * size).view(1, c, size, size))

    def forward(self, x):
        z = self.pre(x)
        return self.gamma * (self.a(x) + self.c(z) + self.b(x)) + self.pos + 0.5


def test_scaled_sum_keeps_other_terms_with_their_scale():
    model = randomize(ScaledSum(), seed=9)
    x = torch.randn(2, 4, 5, 5)
    compiled = qlfx.compile(model, "fold-bn,merge-parallel,dce", (x,))
    assert count_convs(compiled.graph_module) == 3  # pre, merged(a+b), c
    assert _merge_row(compiled).result.stats["sites"] == 1
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
    # the scale of c(z) matters: dropping it would be caught
    with torch.no_grad():
        z = model.pre(x)
        wrong = model.gamma * (model.a(x) + model.b(x)) + model.c(z) + model.pos + 0.5
    assert not torch.allclose(compiled(x), wrong, atol=1e-2)


# ----------------------------------------------------------------------- timm's reparameterisable nets
TIMM_MODELS = ["repvgg_a0", "mobileone_s0", "fastvit_t8"]


def _randomize_layer_scales(model: nn.Module, seed: int) -> None:
    """FastViT's layer scales start at 1e-5, which would hide a wrong token-mixer merge below the
    tolerance: give them random values of order 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_reach_their_deploy_conv_count(name):
    """Written by others (timm): RepVGG, MobileOne (k over-parameterised branches + 1x1 + BN identity) and
    FastViT (RepMixer token mixers x + gamma * (mixer(x) - norm(x)), RepCPE, large-kernel convs) come out
    of the default pipeline with at most as many convs as timm's own reparameterisation."""
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    model = randomize_batchnorm(timm.create_model(name, pretrained=False), seed=3).eval()
    _randomize_layer_scales(model, seed=4)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    deploy = reparameterize_model(copy.deepcopy(model))
    deploy_convs = count_convs(qlfx.trace(deploy, (x,)))
    compiled = qlfx.compile(model, qlfx.DEFAULT_PIPELINE, (x,), verify_inputs=1)
    result = _merge_row(compiled).result
    assert count_convs(compiled.graph_module) <= deploy_convs, result.skipped
    assert result.stats["sites"] > 0 and result.stats["convs"] <= deploy_convs
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(compiled(x), ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
