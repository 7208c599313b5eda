"""basis-change: random group elements on every channel space keep every zoo model's outputs."""
from __future__ import annotations

import copy

import pytest
import torch

import qlfx
import qlfx.passes.basis_change  # noqa: F401  (registers the pass)
from qlfx import ir
from qlfx import symmetry as sym
from qlfx.errors import UsageError
from qlfx.models import ZOO, create_model, randomize_batchnorm
from qlfx.passes.basis_change import BasisChange
from passtools import rel_error, run_pass
from blocks import one_torch_thread  # noqa: F401  (autouse fixture)

TINY = dict(layers=(1, 2, 1, 2), widths=(8, 16, 32, 64), num_classes=10)


def _folded(name, double=False, dynamic_batch=False, **kwargs):
    """BN-folded graph of a zoo model with random BN statistics (float64 throughout with ``double``;
    with ``dynamic_batch`` it runs on other batch sizes than the example's)."""
    model = randomize_batchnorm(create_model(name, **kwargs).eval(), 7)
    shape = (1, 3, 32, 32) if kwargs else (1, 3, 224, 224)
    x = torch.randn(shape)
    if double:
        model, x = model.double(), x.double()
    gm = qlfx.compile(model, "fold-bn,constant-fold,dce", example_inputs=(x,), verify=False,
                      dynamic_batch=dynamic_batch).graph_module
    return gm, x


_rel = rel_error


def _basis_change(gm, x, **options):
    return run_pass(BasisChange(**options), gm, x)


def _weights_changed(a, b) -> bool:
    ta, tb = ir.used_tensors(a), ir.used_tensors(b)
    return ta.keys() != tb.keys() or any(not torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_random_elements_keep_outputs_tiny_variants(name):
    """Every zoo layout at tiny width, random BN statistics, a random element of every space; checked on
    a batch of 3 fresh inputs (a symbolic batch size: the channel slices then read a batch slice first)."""
    gm, x = _folded(name, double=True, dynamic_batch=True, **TINY)
    inputs = torch.randn((3,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    new, result = _basis_change(gm, x, seed=11)
    assert result.changed and result.rewrites
    assert _weights_changed(gm, new)
    # in float64 the rewrite is exact up to rounding ...
    with torch.no_grad():
        err64 = _rel(gm(inputs), new(inputs))
    # ... and with the weights rounded to float32 (what the pass stores for a float32 model) it is
    # within float32 rounding
    g32, n32 = copy.deepcopy(gm).float(), copy.deepcopy(new).float()
    with torch.no_grad():
        err32 = _rel(g32(inputs.float()), n32(inputs.float()))
    assert err32 <= 1e-5, f"{name}: float32 max rel error {err32:.3g}"
    assert err64 <= 1e-12, f"{name}: float64 max rel error {err64:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qlnet50", "qlnet-eq3"])
def test_random_elements_keep_outputs_full_size(name):
    """Full size, checked in float64 (model and inputs converted to double): float32 rounding of the
    rewritten weights alone gives ~1e-6..1e-5 relative output error on 50 layers."""
    gm, x = _folded(name, double=True)
    new, result = _basis_change(gm, x, seed=5)
    assert result.changed
    with torch.no_grad():
        err = _rel(gm(x), new(x))
    assert err <= 1e-10, f"{name}: float64 max rel error {err:.3g}"


def test_through_the_pass_manager_with_options():
    model = randomize_batchnorm(create_model("qlnet-tiny").eval(), 3)
    x = torch.randn(1, 3, 32, 32)
    compiled = qlfx.compile(model, "fold-bn,constant-fold,dce,basis-change<seed=3;spaces=1,6>", example_inputs=(x,))
    row = compiled.report.rows[-1]
    assert row.pass_name == "basis-change" and row.changed and row.check.passed
    assert any(r.startswith("space 1 (positive-monomial") for r in row.result.rewrites)
    assert any(r.startswith("space 6 (O") for r in row.result.rewrites)
    with pytest.raises(UsageError, match="do not exist"):
        qlfx.compile(model, "fold-bn,basis-change<spaces=999>", example_inputs=(x,))


def _layer3_space(gm):
    report = sym.analyze(gm)
    space = report.space("layer3_0_add")  # qlnet-tiny: layer3.0's output (skip + conv3 + add + hardball)
    assert space.group is sym.Group.O and any("layer3.0.act3" in s for s in space.sites)
    return report, space


def test_authors_notebook_one_orthogonal_matrix_across_layer3():
    """The authors' notebook: one orthogonal Q on the whole layer3 stream keeps the outputs."""
    gm, x = _folded("qlnet-tiny", **dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10))
    report, space = _layer3_space(gm)
    q = sym.random_element(sym.Group.O, torch.Generator().manual_seed(0), size=space.size)
    new, result = _basis_change(gm, x, spaces=str(space.id), elements={space.id: q})
    assert result.rewrites == [f"space {space.id} (O, size 32, given): {space.sites[0]}"]
    with torch.no_grad():
        assert _rel(gm(x), new(x)) <= 1e-5
    # the layer3 weights really are rotated: W' = Q W for the skip conv
    w_old = ir.get_tensor(gm, ir.ConvCall.of(next(n for n in gm.graph.nodes if n.name == "layer3_0_skip_conv")).weight)
    w_new = ir.get_tensor(new, ir.ConvCall.of(next(n for n in new.graph.nodes if n.name == "layer3_0_skip_conv")).weight)
    expected = torch.einsum("oa,ai...->oi...", q, w_old.double()).float()
    assert torch.allclose(w_new, expected, atol=1e-6)


def test_a_gl_matrix_through_hardball_changes_the_output():
    """Hardball commutes with O(C) only: a general invertible matrix on its space is not a symmetry.
    The pass refuses it; forced through (check=False) the outputs change -- so the test above can fail."""
    gm, x = _folded("qlnet-tiny", **dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10))
    report, space = _layer3_space(gm)
    gl = sym.random_element(sym.Group.GL, torch.Generator().manual_seed(0), size=space.size, sigma=0.5)
    with pytest.raises(ValueError, match="not in its group"):
        _basis_change(gm, x, spaces=str(space.id), elements={space.id: gl})
    new = copy.deepcopy(gm)
    sym.apply_element(new, space, gl, report, check=False)
    with torch.no_grad():
        assert _rel(gm(x), new(x)) > 1e-3


def test_branch_rescaling_leaves_the_product_alone():
    """(D, D^-1) on the two product halves: the product's own space is derived = identity, so the
    depthwise conv after it is untouched while conv1's rows are rescaled."""
    gm, x = _folded("qlnet-tiny", **dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10))
    report = sym.analyze(gm)
    a, b = report.space("layer1_0_slice"), report.space("layer1_0_slice_1")
    d = torch.exp(torch.randn(a.size, dtype=torch.float64))
    new, _ = _basis_change(gm, x, spaces=f"{a.id},{b.id}", elements={a.id: d, b.id: 1 / d})
    with torch.no_grad():
        assert _rel(gm(x), new(x)) <= 1e-5
    weight = lambda g, n: ir.get_tensor(g, ir.ConvCall.of(next(m for m in g.graph.nodes if m.name == n)).weight)  # noqa: E731
    assert torch.equal(weight(gm, "layer1_0_conv2"), weight(new, "layer1_0_conv2"))
    w_old, w_new = weight(gm, "layer1_0_conv1_conv"), weight(new, "layer1_0_conv1_conv")
    assert torch.allclose(w_new[:a.size], (d.view(-1, 1, 1, 1) * w_old[:a.size].double()).float(), rtol=1e-6)
    # a scaling on the product alone breaks D_z = D_a D_b: refused
    z = report.space("layer1_0_mul")
    with pytest.raises(ValueError, match="D_z = D_a D_b"):
        sym.apply_elements(copy.deepcopy(gm), {z.id: d}, report)


@pytest.mark.parametrize("name", ["qlnet-tiny", "qlnet-eq3-tiny"])
def test_fused_branch_products_are_analysed_like_the_unfused_graph(name):
    """After fuse-product the branches are virtual values of qlfx::branch_product: same spaces, same
    groups, and basis-change still keeps the outputs."""
    pytest.importorskip("qlfx.passes.fuse_product")
    model = randomize_batchnorm(create_model(name).eval(), 4)
    x = torch.randn(1, 3, 32, 32)
    plain = qlfx.compile(model, "fold-bn,constant-fold,dce", example_inputs=(x,), verify=False).graph_module
    fused = qlfx.compile(model, "fold-bn,constant-fold,dce,fuse-product,dce", example_inputs=(x,),
                         verify=False).graph_module
    assert any(n.op == "call_function" and "branch_product" in str(n.target) for n in fused.graph.nodes)
    r_plain, r_fused = sym.analyze(plain), sym.analyze(fused)
    assert r_fused.group_counts() == r_plain.group_counts()
    assert r_fused.continuous_dimension == r_plain.continuous_dimension
    assert not r_fused.notes
    new, result = _basis_change(fused, x, seed=2)
    assert any("branch_product" in n for n in result.notes[0].split(", "))
    with torch.no_grad():
        assert _rel(fused(x), new(x)) <= 1e-5
