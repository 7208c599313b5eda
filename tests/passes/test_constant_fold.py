"""constant-fold: values computed from stored constants only become stored constants, bit for bit.

The folded tensors are compared (torch.equal) with what the unfolded graph computes for the same
nodes, recorded by running it node by node (qlfx.verify.record_values); the folded constants carry
those nodes' value names (ir.VALUE_OF), which pairs them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qlfx
from blocks import one_torch_thread  # noqa: F401  (autouse fixture)
from passtools import capture, run_pass
from qlfx import ir
from qlfx.models import qlnet_eq3, randomize_batchnorm
from qlfx.pass_manager import PassContext, get_pass
from qlfx.verify import Tolerance, compare_tensor, record_values

aten = torch.ops.aten


def _folded(after, names: set[str]) -> dict[str, torch.Tensor]:
    """Stored tensors of ``after`` that carry the value of one of the nodes ``names`` of the graph before."""
    return {n.meta[ir.VALUE_OF]: ir.get_tensor(after, n) for n in after.graph.nodes
            if n.op == "get_attr" and n.meta.get(ir.VALUE_OF) in names}


def test_shared_kernel_repeat_is_folded_bit_for_bit():
    """The paper's Eq.(3) shared 3x3 kernel ``w.repeat(C, 1, 1, 1)`` (zoo model, BN folded first on random
    statistics, so rule 2 of fold-bn keeps the kernel shared) becomes one stored [kC, 1, 3, 3] tensor."""
    model = randomize_batchnorm(qlnet_eq3(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10), seed=2)
    x = torch.randn(2, 3, 32, 32)
    before = qlfx.compile(model.eval(), "fold-bn", (x,)).graph_module
    repeats = [n for n in before.graph.nodes if ir.is_op(n, aten.repeat.default)]
    assert len(repeats) == 4
    after, result = run_pass(get_pass("constant-fold"), before, x)
    assert not any(ir.is_op(n, aten.repeat.default) for n in after.graph.nodes)
    computed = record_values(before, (x,))
    folded = _folded(after, {n.name for n in repeats})
    assert sorted(folded) == sorted(n.name for n in repeats) == sorted(result.rewrites)
    for name, tensor in folded.items():
        assert torch.equal(tensor, computed[name]), name
        k = ir.shape(next(n for n in repeats if n.name == name).args[0])[0]
        assert tensor.shape[1:] == (1, 3, 3) and torch.equal(tensor, tensor[:k].repeat(tensor.shape[0] // k, 1, 1, 1))
    # every conv that read a repeat now reads the stored kernel
    convs = [c for c in map(ir.ConvCall.of, after.graph.nodes) if c is not None and c.groups > 1]
    assert len(convs) == 4 and all(ir.is_constant(c.weight) for c in convs)
    with torch.no_grad():
        assert compare_tensor(model(x), after(x), Tolerance()).passed


class TransposedWeight(nn.Module):
    """``addmm(b, x, w.t())`` written out, as a hand-written linear layer does it."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.w = nn.Parameter(torch.randn(5, 6, generator=gen))
        self.b = nn.Parameter(torch.randn(5, generator=gen))

    def forward(self, x):
        return torch.addmm(self.b, torch.flatten(x, 1), self.w.t())


def test_transposed_weight_read_by_addmm_is_folded_bit_for_bit():
    model = TransposedWeight().eval()
    x = torch.randn(4, 6)
    before = capture(model, x)
    (t,) = [n for n in before.graph.nodes if ir.is_op(n, aten.t.default)]
    after, result = run_pass(get_pass("constant-fold"), before, x)
    assert result.changed and result.rewrites == [t.name]
    (addmm,) = [n for n in after.graph.nodes if ir.is_op(n, aten.addmm.default)]
    weight = addmm.args[2]
    assert ir.is_constant(weight) and weight.meta[ir.VALUE_OF] == t.name
    stored = ir.get_tensor(after, weight)
    assert torch.equal(stored, record_values(before, (x,))[t.name]) and torch.equal(stored, model.w.t())
    assert stored.is_contiguous()  # a new buffer, not a view of w: why the pass is "equivalent", not "exact"
    # through the pass manager's check (equivalent contract), and against the model
    compiled = qlfx.compile(model, "constant-fold", (x,))
    assert compiled.report.rows[-1].check.passed
    with torch.no_grad():
        assert compare_tensor(model(x), compiled(x), Tolerance()).passed


class Random(nn.Module):
    """Random ops whose inputs are all stored constants (or none): rand_like, randn, dropout in training
    mode, bernoulli. Deterministic work beside them (w * 2, w.t()) still folds."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.p = nn.Parameter(torch.full((4, 4), 0.5))

    def forward(self, x):
        noise = torch.rand_like(self.w * 2) + torch.randn(4, 4) + F.dropout(self.w, 0.5, training=True)
        return x @ (noise + torch.bernoulli(self.p) + self.w.t())


RANDOM_OPS = (aten.rand_like.default, aten.randn.default, aten.native_dropout.default, aten.bernoulli.default)


def test_random_ops_are_not_folded():
    model = Random().eval()
    x = torch.randn(3, 4)
    before = capture(model, x)
    after, result = run_pass(get_pass("constant-fold"), before, x)
    for op in RANDOM_OPS:
        assert sum(ir.is_op(n, op) for n in after.graph.nodes) == 1, op
    # the deterministic constant work is folded: the scaling fed to rand_like, and the transpose
    assert not any(ir.is_op(n, aten.mul.Tensor, aten.t.default) for n in after.graph.nodes)
    assert len(result.rewrites) == 2
    # the graph still draws fresh values on every call
    torch.manual_seed(0)
    first = after(x)
    assert not torch.equal(first, after(x))


def test_nothing_to_fold_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 6, 6)
    after, result = run_pass(get_pass("constant-fold"), capture(model, x), x)
    assert not result.changed and not result.rewrites


@pytest.mark.parametrize("limit", [0, 1])
def test_rewrite_limit_for_bisection(limit):
    model = randomize_batchnorm(qlnet_eq3(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10), seed=2)
    x = torch.randn(1, 3, 32, 32)
    gm = qlfx.compile(model.eval(), "fold-bn", (x,)).graph_module
    ctx = PassContext(example_inputs=(x,), rewrite_limit=limit)
    result = get_pass("constant-fold").run(ir.copy_graph_module(gm), ctx)
    assert len(result.rewrites) == limit
