"""qlfx.symmetry.optimize: the L1 optimiser over the symmetry group keeps outputs and lowers L1."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import qlfx
from qlfx import symmetry
from qlfx.models import Hardball, create_model, randomize_batchnorm
from qlfx.symmetry.optimize import l1_of_weights, minimize_l1, orthogonal_from_skew


def _folded(model: nn.Module, shape=(2, 3, 32, 32)):
    """BN-folded graph, any batch size."""
    model.eval()
    return qlfx.compile(model, "fold-bn,constant-fold,dce", example_inputs=(torch.randn(shape),),
                        dynamic_batch=True).graph_module


@pytest.mark.parametrize("orthogonal_map", ["expm", "cayley"])
def test_orthogonal_maps_give_orthogonal_matrices(orthogonal_map):
    a = torch.randn(7, 7, dtype=torch.float64)
    q = orthogonal_from_skew(a, orthogonal_map)
    assert torch.allclose(q.T @ q, torch.eye(7, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(q, torch.eye(7, dtype=torch.float64))  # a real rotation, not the identity


@pytest.fixture(scope="module")
def tiny_folded():
    """qlnet-tiny with random weights and random BN statistics, BN folded (shared: compiling is slow)."""
    return _folded(randomize_batchnorm(create_model("qlnet-tiny"), seed=3))


def test_minimize_l1_keeps_outputs_and_lowers_l1_on_zoo_model(tiny_folded):
    gm = tiny_folded
    report = symmetry.analyze(gm)
    elements, history = minimize_l1(gm, steps=20, lr=0.03, report=report)
    assert history[-1] < 0.85 * history[0], history[:: max(1, len(history) // 5)]
    assert elements, "no space optimised"
    for sid, e in elements.items():
        assert symmetry.is_member(e, report.spaces[sid].group), f"space {sid} element left its group"
    new = qlfx.ir.copy_graph_module(gm)
    symmetry.apply_elements(new, elements, report)
    # the objective the optimiser reports is the L1 of the rewritten weights
    assert math.isclose(l1_of_weights(new), history[-1], rel_tol=1e-4)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, out = gm(x), new(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


class _RotatedStream(nn.Module):
    """x -> W1 -> hardball -> W2 with W1 = Q diag(d), W2 = diag(e) Q^T: the stream's O(6) symmetry
    can undo Q, and the L1 optimum is then sum|d| + sum|e| (diagonal weights)."""

    def __init__(self, q, d, e):
        super().__init__()
        self.w1 = nn.Linear(6, 6, bias=False)
        self.w2 = nn.Linear(6, 6, bias=False)
        self.act = Hardball(radius=2.0)
        with torch.no_grad():
            self.w1.weight.copy_(q @ torch.diag(d))
            self.w2.weight.copy_(torch.diag(e) @ q.T)

    def forward(self, x):
        return self.w2(self.act(self.w1(x)))


def test_minimize_l1_finds_the_rotation_that_sparsifies():
    gen = torch.Generator().manual_seed(0)
    skew = torch.randn(6, 6, generator=gen, dtype=torch.float64) * 0.15
    q = torch.linalg.matrix_exp(skew - skew.T).float()
    d = torch.tensor([2.0, 1.5, 1.0, 0.8, 0.5, 0.3])
    e = torch.tensor([1.0, 0.7, 1.2, 0.9, 0.4, 0.6])
    model = _RotatedStream(q, d, e).eval()
    gm = qlfx.compile(model, "dce", example_inputs=(torch.randn(3, 6),)).graph_module
    optimum = float(d.abs().sum() + e.abs().sum())
    elements, history = minimize_l1(gm, steps=300, lr=0.01)
    assert history[0] > 1.3 * optimum  # the rotated weights are far from sparse
    assert history[-1] <= 1.02 * optimum, (history[0], history[-1], optimum)


class _ScaledRelu(nn.Module):
    """W2 relu(W1 x) with channel c of the hidden layer scaled by s_c in W1 and 1/s_c in W2: the
    positive scalings can undo s (L1 of s_c a + b / s_c is minimal at s_c = sqrt(b / a))."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(5, 8)
        self.w2 = nn.Linear(8, 3)
        s = torch.tensor([20.0, 0.05, 7.0, 0.1, 1.0, 15.0, 0.2, 3.0])
        with torch.no_grad():
            self.w1.weight.mul_(s[:, None])
            self.w1.bias.mul_(s)
            self.w2.weight.div_(s[None, :])

    def forward(self, x):
        return self.w2(torch.relu(self.w1(x)))


def test_minimize_l1_balances_positive_scalings():
    model = _ScaledRelu().eval()
    gm = qlfx.compile(model, "dce", example_inputs=(torch.randn(3, 5),)).graph_module
    report = symmetry.analyze(gm)
    assert any(s.group.value == "positive-monomial" for s in report.spaces)
    elements, history = minimize_l1(gm, steps=300, lr=0.05, report=report)
    # closed form per channel: min_s s a + b / s = 2 sqrt(a b)
    w1, w2 = model.w1.weight.detach().double(), model.w2.weight.detach().double()
    a, b = w1.abs().sum(1), w2.abs().sum(0)
    optimum = float((2 * (a * b).sqrt()).sum())
    assert history[-1] <= 1.01 * optimum, (history[0], history[-1], optimum)
    new = qlfx.ir.copy_graph_module(gm)
    symmetry.apply_elements(new, elements, report)
    x = torch.randn(16, 5)
    with torch.no_grad():
        assert torch.allclose(new(x), gm(x), rtol=1e-4, atol=1e-4 * float(gm(x).abs().max()))


def test_minimize_l1_refuses_a_derived_product_space(tiny_folded):
    gm = tiny_folded
    report = symmetry.analyze(gm)
    derived = next(s for s in report.spaces if s.derived)
    with pytest.raises(ValueError, match="derived"):
        minimize_l1(gm, spaces=[derived.id], steps=1, report=report)
