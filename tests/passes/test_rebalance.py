"""rebalance: equivalence with random BN statistics, and a lower weight norm on unbalanced models."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

import qlfx
import qlfx.passes.rebalance  # noqa: F401  (registers the pass)
from qlfx import ir
from qlfx.models import create_model, randomize_batchnorm
from qlfx.passes.rebalance import Rebalance, weight_norm_squared
from passtools import rel_error, run_pass
from blocks import one_torch_thread  # noqa: F401  (autouse fixture)


_rel = rel_error


def _run(gm, x, **options):
    return run_pass(Rebalance(**options), gm, x)


@pytest.mark.parametrize("name", ["qlnet-tiny", "qlnet-eq3-tiny", "qlnet-eq3-relu"])
def test_rebalance_is_equivalent_and_never_increases_the_norm(name):
    kwargs = {} if name.endswith("tiny") else dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)
    model = randomize_batchnorm(create_model(name, **kwargs).eval(), 2)
    x = torch.randn(2, 3, 32, 32)
    compiled = qlfx.compile(model, "fold-bn,constant-fold,dce,rebalance", example_inputs=(x,))
    row = compiled.report.rows[-1]
    assert row.pass_name == "rebalance" and row.check.passed
    stats = row.result.stats
    assert stats["norm_squared_after"] <= stats["norm_squared_before"]
    gm = compiled.graph_module
    with torch.no_grad():
        assert _rel(model(x), gm(x)) <= 1e-5
    # a second run finds (almost) nothing left to gain
    again, result = _run(gm, x)
    assert result.stats["norm_squared_after"] >= 0.999 * result.stats["norm_squared_before"]


class Branches(nn.Module):
    """z = conv_a(x) * conv_b(x) -> conv_c, with ReLU space behind conv_c -> conv_d."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 6, 1)
        self.b = nn.Conv2d(4, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 5, 1)
        self.d = nn.Conv2d(5, 3, 1)

    def forward(self, x):
        return self.d(torch.relu(self.c(self.a(x) * self.b(x))))


def test_rebalance_undoes_a_hand_made_branch_imbalance():
    torch.manual_seed(0)
    model = Branches().eval()
    x = torch.randn(2, 4, 8, 8)
    balanced = qlfx.compile(model, "rebalance", example_inputs=(x,)).graph_module
    with torch.no_grad():  # (100, 1/100) on the two branches: same function, much bigger weights
        model.a.weight.mul_(100), model.a.bias.mul_(100)
        model.b.weight.mul_(0.01), model.b.bias.mul_(0.01)
        model.c.weight.mul_(30), model.c.bias.mul_(30)  # and an imbalance across the ReLU
        model.d.weight.mul_(1 / 30)
    gm = qlfx.compile(model, None, example_inputs=(x,)).graph_module
    before = weight_norm_squared(gm)
    new, result = _run(gm, x)
    after = weight_norm_squared(new)
    assert result.changed
    assert after < before / 100  # the imbalance is gone ...
    assert after <= 1.01 * weight_norm_squared(balanced)  # ... down to the balanced optimum
    assert result.stats["norm_squared_after"] == pytest.approx(after, rel=1e-5)
    with torch.no_grad():
        assert _rel(gm(x), new(x)) <= 1e-5
    text = " ".join(result.notes)
    assert "->" in text and "sum of squared weight norms" in text


def test_rebalance_closed_form_on_two_linear_layers():
    """y = W2 diag(d) diag(1/d) W1 x: the optimum balances each hidden unit's row and column norm,
    d_i = sqrt(|col_i W2| / |row_i W1|) -- after the pass both are equal for every hidden unit."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([10.0, 1.0, 0.1, 3.0])[:, None])
    x = torch.randn(3, 5)
    gm = qlfx.compile(model, None, example_inputs=(x,)).graph_module
    new, _ = _run(gm, x, sweeps=1)
    lin = [ir.LinearCall.of(n) for n in new.graph.nodes if ir.LinearCall.of(n) is not None]
    row = ir.get_tensor(new, lin[0].weight).norm(dim=1)
    col = ir.get_tensor(new, lin[1].weight).norm(dim=0)
    assert torch.allclose(row, col, rtol=1e-5)
    with torch.no_grad():
        assert _rel(gm(x), new(x)) <= 1e-5
