"""equalize: equivalence on the zoo layouts and a torchvision ResNet (random weights, random BN statistics),
DFQ's closed form on two layers, and lower ranges / int8 error where one channel is an outlier."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qlfx
import qlfx.passes.equalize  # noqa: F401  (registers the pass)
import qlfx.passes.rotate  # noqa: F401
from qlfx import ir
from qlfx.errors import UsageError
from qlfx.models import create_model, randomize_batchnorm
from qlfx.symmetry.quant_objective import activation_error
from passtools import rel_error
from quanttools import folded, run_verified, simulated_int8_error
from blocks import one_torch_thread  # noqa: F401  (autouse fixture)

_TINY = dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)
# every zoo layout at test size: (name, keyword overrides, pipeline prefix). qlnet50 / qlnet26 are the
# qlnet-tiny layout with more blocks; the full set of eq3 variants runs with -m slow.
LAYOUTS = [
    ("qlnet-tiny", {}, ""),
    ("qlnet-tiny", {}, "fuse-product,"),  # fused products: branch weights and branch rescalings
    ("qlnet-eq3-tiny", {}, ""),
    ("qlnet-eq3-relu", _TINY, ""),
]
SLOW_LAYOUTS = [(name, _TINY, "") for name in ("qlnet-eq3", "qlnet-eq3-hardtanh", "qlnet-eq3-hardball",
                                                "qlnet-eq3-nows", "qlnet-eq3-nows-x6")]


def _check_layout(name, kwargs, prefix):
    model = randomize_batchnorm(create_model(name, **kwargs).eval(), seed=3)
    x = torch.randn(2, 3, 32, 32)
    calibration = [(torch.randn(2, 3, 32, 32),) for _ in range(2)]
    gm = folded(model, x)
    new, rows = run_verified(gm, prefix + "equalize,rotate", x, calibration)
    for p in ("equalize", "rotate"):
        assert rows[p].check.passed, (p, rows[p].check)
    eq = rows["equalize"].result
    assert eq.changed and eq.stats["objective_after"] < eq.stats["objective_before"]
    held_out = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # independently of the pass manager: same function as the user's model
        assert rel_error(model(held_out), new(held_out)) <= 1e-4
    return rows


@pytest.mark.parametrize("name,kwargs,prefix", LAYOUTS, ids=[f"{n}{'-fused' if p else ''}" for n, _, p in LAYOUTS])
def test_equalize_and_rotate_are_equivalent_on_zoo_layouts(name, kwargs, prefix):
    _check_layout(name, kwargs, prefix)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,prefix", SLOW_LAYOUTS, ids=[n for n, _, _ in SLOW_LAYOUTS])
def test_equalize_and_rotate_are_equivalent_on_every_eq3_variant(name, kwargs, prefix):
    _check_layout(name, kwargs, prefix)


def _check_relu_net(model, x):
    model = randomize_batchnorm(model.eval(), seed=5)
    gm = folded(model, x)
    new, rows = run_verified(gm, "equalize", x, [(torch.randn(1, 3, 32, 32),)])
    result = rows["equalize"].result
    assert rows["equalize"].check.passed and result.changed
    assert result.stats["objective_after"] < 0.9 * result.stats["objective_before"]
    with torch.no_grad():
        held_out = torch.randn(1, 3, 32, 32)
        assert rel_error(model(held_out), new(held_out)) <= 1e-4


def test_equalize_is_equivalent_on_torchvision_style_resnet():
    import realnets  # small ResNet / ResNeXt written the way torchvision writes them

    _check_relu_net(realnets.resnet_basic(), torch.randn(1, 3, 32, 32))
    _check_relu_net(realnets.resnext_d(), torch.randn(1, 3, 32, 32))


@pytest.mark.slow
def test_equalize_is_equivalent_on_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    _check_relu_net(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32))


def _linears(gm):
    return [ir.LinearCall.of(n) for n in gm.graph.nodes if ir.LinearCall.of(n) is not None]


def test_equalize_is_dfq_closed_form_on_two_layers():
    """W2 relu(W1 x): DFQ's optimum makes each hidden unit's row range in W1 equal its column range in W2
    (both sqrt(r1 r2)), here relative to each tensor's max (one global factor per space, which changes no
    relative precision); with q large the pass reaches it (a q-norm of 5 entries is within 5^(1/q) of max)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([20.0, 1.0, 0.05, 3.0])[:, None])
        model[0].bias.mul_(torch.tensor([20.0, 1.0, 0.05, 3.0]))
    x = torch.randn(3, 5)
    gm = folded(model, x)
    w1, w2 = (ir.get_tensor(gm, v.weight).detach() for v in _linears(gm))
    r1, r2 = w1.abs().amax(1), w2.abs().amax(0)
    new, rows = run_verified(gm, "equalize<q=32;sweeps=30>", x)
    assert rows["equalize"].check.passed
    v1, v2 = (ir.get_tensor(new, v.weight).detach() for v in _linears(new))
    row, col = v1.abs().amax(1), v2.abs().amax(0)
    ratio = row / col
    assert torch.allclose(ratio, ratio.mean().expand(4), rtol=0.05), (row, col)
    target = (r1 * r2).sqrt()
    assert torch.allclose(row / row.max(), target / target.max(), rtol=0.05)
    assert float(row.max() / row.min()) < 0.5 * float(r1.max() / r1.min())  # the spread really went down


class OutlierNet(nn.Module):
    """conv(3->8) -> ReLU -> conv(8->6) -> ReLU -> conv(6->4): channel 0 of the first ReLU space is 40x the
    others (a positive-monomial space: DFQ territory)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 4, 1)
        with torch.no_grad():
            self.c1.weight[0].mul_(40), self.c1.bias[0].mul_(40)
            self.c2.weight[:, 0].div_(40)  # same function scale as a balanced net

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def test_equalize_lowers_range_spread_and_int8_error_on_an_outlier_channel():
    torch.manual_seed(2)
    model = OutlierNet().eval()
    x = torch.randn(4, 3, 12, 12)
    calibration = [(torch.randn(4, 3, 12, 12),) for _ in range(2)]
    gm = folded(model, x)
    new, rows = run_verified(gm, "equalize", x, calibration)
    result = rows["equalize"].result
    assert rows["equalize"].check.passed and result.changed
    stats = result.stats["per_space"]
    relu_space = min(stats)  # the first ReLU space (ids follow graph order)
    before, after = stats[relu_space]["before"], stats[relu_space]["after"]
    assert after["activation_range_spread"] < 0.5 * before["activation_range_spread"]
    assert after["activation_error"] < 0.25 * before["activation_error"]
    assert after["weight_range_spread"] < before["weight_range_spread"]
    assert any("activation range max/mean" in r for r in result.rewrites)
    held_out = torch.randn(8, 3, 12, 12)
    err_before, err_after = simulated_int8_error(gm, held_out), simulated_int8_error(new, held_out)
    assert err_after < 0.5 * err_before, (err_before, err_after)


def test_activation_error_formula():
    # uniform grid of step s over [-1, 3]: noise s^2/12 relative to E[x^2]
    assert activation_error(-1.0, 3.0, 2.0) == pytest.approx((4 / 255) ** 2 / 12 / 2)
    assert activation_error(0.5, 3.0, 2.0) == activation_error(0.0, 3.0, 2.0)  # the grid always holds 0


def test_equalize_rejects_bad_options_and_leaves_rigid_graphs_alone():
    x = torch.randn(2, 4)
    gm = folded(nn.Sequential(nn.Linear(4, 3)).eval(), x)
    for bad in ("0", "100"):
        with pytest.raises(UsageError, match="q must be"):
            run_verified(gm, f"equalize<q={bad}>", x)
    new, rows = run_verified(gm, "equalize", x)  # input -> output: identity spaces only
    assert not rows["equalize"].result.changed
    assert "no space allows positive rescalings" in rows["equalize"].result.notes
