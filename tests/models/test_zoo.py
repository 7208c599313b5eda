"""Tests for qlfx.models: activations, the two QLNet layouts, the registry and BN randomization."""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import qlfx
from qlfx.models import (
    DEFAULT_MODEL,
    ZOO,
    Eq3Block,
    Hardball,
    PDEBlock,
    Softball,
    create_model,
    default_input_shape,
    qlnet,
    qlnet26,
    qlnet50,
    qlnet_eq3,
    randomize_batchnorm,
)

TINY = dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


RADIAL_OPS = (torch.ops.qlfx.hardball.default, torch.ops.qlfx.softball.default)


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 5), (3, 7, 4, 6)])
def test_hardball_projects_onto_ball_and_is_identity_inside(shape):
    torch.manual_seed(0)
    channels = shape[1]
    r = math.sqrt(channels)
    # Mix of pixels well inside and well outside the ball.
    x = torch.randn(shape) * torch.where(torch.rand((shape[0], 1) + shape[2:]) < 0.5, 0.2, 5.0)
    y = Hardball()(x)
    norm_x = x.norm(dim=1, keepdim=True)
    norm_y = y.norm(dim=1, keepdim=True)
    inside = norm_x <= r
    assert inside.any() and (~inside).any()
    assert torch.all(norm_y <= r * (1 + 1e-6))
    # Identity inside, radial projection (same direction, norm exactly r) outside.
    assert torch.equal(torch.where(inside, y, x), x)
    torch.testing.assert_close(norm_y[~inside], torch.full_like(norm_y[~inside], r))
    torch.testing.assert_close(torch.where(inside, x, y), torch.where(inside, x, x * r / norm_x))


def test_hardball_zero_input_and_gradient_are_finite():
    x = torch.zeros(2, 4, 3, 3, requires_grad=True)
    for act in (Hardball(), Softball()):
        y = act(x)
        y.sum().backward()
        assert torch.equal(y, torch.zeros_like(y))
        assert torch.isfinite(x.grad).all()
        x.grad = None


@pytest.mark.parametrize("shape", [(10, 3), (2, 6, 5, 4)])
def test_softball_formula(shape):
    torch.manual_seed(1)
    x = torch.randn(shape) * 3
    channels = shape[1]
    expected = x / torch.sqrt(1 + (x * x).sum(1, keepdim=True) / channels)
    torch.testing.assert_close(Softball()(x), expected)
    assert torch.all(Softball()(x).norm(dim=1) < math.sqrt(channels))


def test_radius_override_and_repr():
    torch.manual_seed(2)
    x = torch.randn(4, 9, 3, 3) * 4
    hard = Hardball(radius=0.5)
    soft = Softball(radius=2.0)
    assert hard.radius == 0.5 and Hardball().radius is None
    assert torch.all(hard(x).norm(dim=1) <= 0.5 * (1 + 1e-6))
    torch.testing.assert_close(soft(x), x / torch.sqrt(1 + (x * x).sum(1, keepdim=True) / 4.0))
    # Default radius sqrt(9) = 3 differs from the override: outputs must differ.
    assert not torch.allclose(Softball()(x), soft(x))
    assert "radius=0.5" in repr(hard) and "sqrt(C)" in repr(Softball())
    with pytest.raises(ValueError, match="radius"):
        Hardball(radius=0.0)


# ----------------------------------------------------------------------------------------------
# Authors' PDEBlock layout: state-dict compatibility
# ----------------------------------------------------------------------------------------------


def authors_state_dict_shapes(layers, widths=(64, 128, 256, 512), num_classes=1000, in_chans=3):
    """Independent re-statement of the authors' resnet.py (PDEBlock) keys and shapes."""
    shapes = {}

    def bn(prefix, n):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (n,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (widths[0], in_chans, 7, 7)
    bn("bn1", widths[0])
    inplanes = widths[0]
    for s, (planes, blocks) in enumerate(zip(widths, layers)):
        for b in range(blocks):
            p = f"layer{s + 1}.{b}"
            width = inplanes * (4 if inplanes <= 128 else 2)
            shapes[f"{p}.conv1.conv.weight"] = (2 * width, inplanes, 1, 1)
            bn(f"{p}.conv1.bn", 2 * width)
            shapes[f"{p}.conv2.weight"] = (2 * width, 1, 3, 3)
            bn(f"{p}.bn2", 2 * width)
            shapes[f"{p}.conv3.conv.weight"] = (planes, 2 * width, 1, 1)
            bn(f"{p}.conv3.bn", planes)
            if s > 0 and b == 0:
                shapes[f"{p}.skip.conv.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.skip.bn", planes)
            inplanes = planes
    shapes["fc.weight"] = (num_classes, widths[-1])
    shapes["fc.bias"] = (num_classes,)
    return shapes


def test_pde_state_dict_matches_authors_names_and_loads_strict():
    layers = (1, 2, 1, 1)
    expected = authors_state_dict_shapes(layers)
    model = qlnet(layers=layers)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(expected), (
        f"missing: {sorted(set(expected) - set(ours))}, unexpected: {sorted(set(ours) - set(expected))}"
    )
    assert ours == expected

    generator = torch.Generator().manual_seed(3)
    checkpoint = {}
    for key, shape in expected.items():
        if key.endswith("num_batches_tracked"):
            checkpoint[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_var"):
            checkpoint[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            checkpoint[key] = torch.randn(shape, generator=generator)
    result = model.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # Tensors landed at the right modules.
    torch.testing.assert_close(model.layer2[0].conv1.conv.weight, checkpoint["layer2.0.conv1.conv.weight"])
    torch.testing.assert_close(model.layer2[0].skip.bn.running_var, checkpoint["layer2.0.skip.bn.running_var"])
    torch.testing.assert_close(model.layer2[1].conv2.weight, checkpoint["layer2.1.conv2.weight"])
    torch.testing.assert_close(model.layer3[0].bn2.bias, checkpoint["layer3.0.bn2.bias"])
    torch.testing.assert_close(model.fc.weight, checkpoint["fc.weight"])
    assert int(model.layer4[0].conv3.bn.num_batches_tracked) == 7
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key


def authors_pde_block_forward(block: PDEBlock, x: torch.Tensor) -> torch.Tensor:
    """The authors' PDEBlock.forward (eval), written with x.size() arithmetic and functional ops."""

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    downsample = block.act3 is not None
    x0 = bn(block.skip.bn, F.conv2d(x, block.skip.conv.weight, stride=2)) if downsample else x
    z = bn(block.conv1.bn, F.conv2d(x, block.conv1.conv.weight))
    c = z.size()[1]
    z = z[:, : c // 2] * z[:, c // 2 :]
    z = bn(block.bn2, F.conv2d(z, block.conv2.weight, stride=block.conv2.stride, padding=1, groups=c // 2))
    out = bn(block.conv3.bn, F.conv2d(z, block.conv3.conv.weight)) + x0
    if downsample:
        r = math.sqrt(out.size()[1])
        norm = torch.sqrt((out * out).sum(1, keepdim=True))
        out = torch.where(norm > r, r * out / norm, out)
    return out


@pytest.mark.parametrize("inplanes,outplanes,stride", [(16, 16, 1), (16, 32, 2), (160, 320, 2)])
def test_pde_block_matches_authors_forward(inplanes, outplanes, stride):
    torch.manual_seed(4)
    block = randomize_batchnorm(PDEBlock(inplanes, outplanes, stride), seed=4).eval()
    expected_width = 4 * inplanes if inplanes <= 128 else 2 * inplanes
    assert block.conv2.in_channels == expected_width and block.conv2.groups == expected_width
    assert (block.act3 is not None) == (stride == 2)
    x = torch.randn(2, inplanes, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), authors_pde_block_forward(block, x), rtol=1e-4, atol=1e-4)


def test_pde_final_hardball_radius_is_final_width():
    model = qlnet50()
    assert math.isclose(model.act.radius, math.sqrt(512))
    assert math.isclose(model.layer2[0].act3.radius, math.sqrt(128))
    assert all(block.act3 is None for block in list(model.layer1) + list(model.layer3)[1:])
    assert len(qlnet26().layer3) == 12 and len(qlnet26().layer2) == 8


# ----------------------------------------------------------------------------------------------
# Paper Eq.(3) layout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exact,paper",
    [
        (dict(weight_sharing=True, expansion=4), 8_608_868, 8.61e6),
        (dict(weight_sharing=False, expansion=4), 8_728_100, 8.73e6),
        (dict(weight_sharing=False, expansion=6), 12_971_044, 13.0e6),
    ],
)
def test_eq3_param_counts(kwargs, exact, paper):
    n = count_params(qlnet_eq3(num_classes=100, **kwargs))
    assert n == exact
    assert abs(n - paper) / paper < 0.005


def test_zoo_eq3_default_is_ws_softball_100_classes():
    model = create_model("qlnet-eq3")
    assert count_params(model) == 8_608_868
    assert model.fc.out_features == 100 and model.weight_sharing
    assert isinstance(model.layer1[0].act, Softball)
    assert count_params(create_model("qlnet-eq3-nows")) == 8_728_100


def eq3_block_reference(block: Eq3Block, u: torch.Tensor) -> torch.Tensor:
    """Eq.(3) block written channel by channel from the math (no repeat / grouped-conv tricks)."""

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    k, s = block.expansion, block.stride
    h_channels = []
    for j in range(k * block.inplanes):
        kernel = block.dw.weight[j % k] if block.weight_sharing else block.dw.weight[j]
        h_channels.append(F.conv2d(u[:, j // k : j // k + 1], kernel[None], stride=s, padding=1))
    h = bn(block.bn1, torch.cat(h_channels, 1))
    a = torch.einsum("oi,nihw->nohw", block.conv_a.weight[:, :, 0, 0], u[:, :, ::s, ::s])
    out = bn(block.bn2, torch.einsum("oi,nihw->nohw", block.conv_out.weight[:, :, 0, 0], a * h))
    if isinstance(block.shortcut, nn.Identity):
        out = out + u
    else:
        sc = torch.einsum("oi,nihw->nohw", block.shortcut.conv.weight[:, :, 0, 0], u[:, :, ::s, ::s])
        out = out + bn(block.shortcut.bn, sc)
    return block.act(out) if block.act is not None else out


@pytest.mark.parametrize("weight_sharing", [True, False])
@pytest.mark.parametrize("inplanes,outplanes,stride,k", [(6, 6, 1, 4), (6, 12, 2, 3)])
def test_eq3_block_matches_reference(weight_sharing, inplanes, outplanes, stride, k):
    torch.manual_seed(5)
    block = Eq3Block(inplanes, outplanes, stride, expansion=k, weight_sharing=weight_sharing, act=Softball())
    block = randomize_batchnorm(block, seed=5).eval()
    if weight_sharing:
        assert tuple(block.dw.weight.shape) == (k, 1, 3, 3)
    u = torch.randn(2, inplanes, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(block(u), eq3_block_reference(block, u), rtol=1e-4, atol=1e-4)


def test_eq3_activation_placement():
    model = qlnet_eq3(activation="hardtanh")
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    assert len(blocks) == 16
    with_act = [b for b in blocks if b.act is not None]
    assert len(with_act) == 4 and all(isinstance(b.act, nn.Hardtanh) for b in with_act)
    assert all(stage[0].act is not None for stage in (model.layer1, model.layer2, model.layer3, model.layer4))
    relu = qlnet_eq3(activation="relu_all", **TINY)
    assert all(isinstance(b.act, nn.ReLU) for s in (relu.layer1, relu.layer2, relu.layer3, relu.layer4) for b in s)
    with pytest.raises(ValueError, match="softball"):
        qlnet_eq3(activation="gelu")


# ----------------------------------------------------------------------------------------------
# Tracing, forward shapes
# ----------------------------------------------------------------------------------------------

TRACE_CASES = {
    "qlnet-tiny": lambda: create_model("qlnet-tiny"),
    "qlnet-eq3-tiny": lambda: create_model("qlnet-eq3-tiny"),
    "eq3-tiny-hardball-nows": lambda: qlnet_eq3(num_classes=10, activation="hardball", weight_sharing=False, **TINY),
    "eq3-tiny-hardtanh": lambda: qlnet_eq3(num_classes=10, activation="hardtanh", expansion=6, **TINY),
    "eq3-tiny-relu": lambda: qlnet_eq3(num_classes=10, activation="relu_all", layers=(2, 2, 1, 1), widths=TINY["widths"]),
    "qlnet-small-2blocks": lambda: qlnet(layers=(2, 2, 1, 1), widths=(8, 16, 32, 64), num_classes=10),
}


@pytest.mark.parametrize("name", sorted(TRACE_CASES))
def test_traceable_and_traced_output_matches(name):
    torch.manual_seed(6)
    model = randomize_batchnorm(TRACE_CASES[name](), seed=6).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = qlfx.trace(model, (x,))
    radial_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in RADIAL_OPS]
    radial_modules = [m for m in model.modules() if isinstance(m, (Hardball, Softball))]
    # each radial activation is one node of qlfx's custom op, with its radius as the argument
    assert len(radial_nodes) == len(radial_modules)
    assert [n.args[1] for n in radial_nodes] == [m.radius for m in radial_modules]
    if "relu" not in name and "hardtanh" not in name:
        assert radial_nodes, "radial activations must be single nodes in the capture"
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 10)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(gm(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["qlnet-tiny", "qlnet-eq3-tiny"])
def test_tiny_models_capture_with_a_symbolic_batch_and_trace_symbolically(name):
    """Both ways in: torch.export with a symbolic batch (runs at any batch size), and a plain
    torch.fx.symbolic_trace (for other fx-based tools: the custom ops are single call_functions)."""
    model = randomize_batchnorm(create_model(name), seed=7).eval()
    gm = qlfx.trace(model, (torch.randn(1, 3, 32, 32),), dynamic_batch=True)
    plain = torch.fx.symbolic_trace(model)
    assert any(n.target in (torch.ops.qlfx.hardball, torch.ops.qlfx.softball) for n in plain.graph.nodes)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x))
            torch.testing.assert_close(plain(x), model(x))


def test_qlnet50_forward_shape_at_224():
    torch.manual_seed(8)
    model = randomize_batchnorm(qlnet50(), seed=8).eval()
    with torch.no_grad():
        y = model(torch.randn(default_input_shape("qlnet50")))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_registry_contents_and_errors():
    required = {"qlnet50", "qlnet26", "qlnet-eq3", "qlnet-eq3-hardball", "qlnet-eq3-nows", "qlnet-eq3-relu",
                "qlnet-tiny", "qlnet-eq3-tiny"}
    assert required <= set(ZOO)
    assert DEFAULT_MODEL in ZOO
    assert default_input_shape("qlnet50") == (1, 3, 224, 224)
    assert default_input_shape("qlnet-eq3-tiny") == (1, 3, 32, 32)
    assert isinstance(create_model("qlnet-eq3-hardball").layer2[0].act, Hardball)
    assert create_model("qlnet-tiny", num_classes=5).fc.out_features == 5
    with pytest.raises(ValueError, match="Did you mean 'qlnet50'"):
        create_model("qlnet5O")
    with pytest.raises(ValueError, match="qlnet-eq3-tiny"):
        default_input_shape("nope")


# ----------------------------------------------------------------------------------------------
# randomize_batchnorm
# ----------------------------------------------------------------------------------------------


def test_randomize_batchnorm_changes_stats_and_is_deterministic():
    def make():
        return nn.Sequential(nn.BatchNorm1d(50), nn.BatchNorm2d(60), nn.BatchNorm3d(40))

    fresh = make()
    a = randomize_batchnorm(make(), seed=11)
    b = randomize_batchnorm(make(), seed=11)
    c = randomize_batchnorm(make(), seed=12)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
        if not key.endswith("num_batches_tracked"):
            assert not torch.equal(value, fresh.state_dict()[key]), key
            assert not torch.equal(value, c.state_dict()[key]), key
    for bn in a:
        assert bn.running_var.min() >= 0.5 and bn.running_var.max() <= 2.0
        magnitude = bn.weight.abs()
        assert magnitude.min() >= 0.5 and magnitude.max() <= 1.5
        assert (bn.weight < 0).any() and (bn.weight > 0).any()
    # Returns the model; randomizing then running in eval changes the output.
    model = create_model("qlnet-eq3-tiny").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        assert randomize_batchnorm(model, seed=0) is model
        assert not torch.allclose(before, model(x))
