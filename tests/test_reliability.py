"""Reliability: common ConvNet blocks through the default pipeline and the emitters, property-based random
nets, regression tests for silent-wrong rewrites known elsewhere, and bad inputs.

The heavy version of the property test runs with ``QLFX_STRESS=1 pytest tests/stress`` (200+ examples).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qlfx
from blocks import ACTIVATIONS, BLOCK_KINDS, ConvBN, ConvNet, SqueezeExcite, randomize
from blocks import one_torch_thread  # noqa: F401  (autouse fixture)
from qlfx import debug, ir
from qlfx.errors import UnsupportedOpsError, UsageError
from qlfx.models import qlnet, qlnet_eq3
from qlfx.pass_manager import Pass, PassResult

aten = torch.ops.aten


def _onnx_available() -> str | None:
    try:
        import onnxruntime  # noqa: F401

        from qlfx.emit.onnx import export_onnx  # noqa: F401
    except ImportError as err:
        return f"ONNX emitter or onnxruntime not available: {err}"
    return None


def _all_equivalent_pipeline() -> str:
    """The default pipeline plus every registered equivalent pass that applies to plain ConvNets."""
    names = qlfx.list_passes()
    extra = [p for p in ("merge-parallel", "fuse-product") if p in names]
    return ",".join(["fold-bn"] + extra + ["constant-fold", "dce"])


def check_net(net: nn.Module, x: torch.Tensor, pipeline: str, tmp_path, onnx: bool = True, tvm: bool = False):
    """Compile (every pass verified by the pass manager), check the result end to end against the
    model, then emit ONNX / TVM and compare those to the model too. Returns the Compiled."""
    state = copy.deepcopy(net.state_dict())
    compiled = qlfx.compile(net, pipeline, (x,))
    with torch.no_grad():
        ref = net(x)
        got = compiled(x)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-4 * scale + 1e-6
    if onnx and _onnx_available() is None:
        path = compiled.to_onnx(tmp_path / "m.onnx")
        cmp = debug.compare_artifact(net, path, (x,), tolerance=1e-4, count=2)
        assert cmp.passed, str(cmp)
    if tvm:
        module = compiled.to_tvm("llvm", progress=False)
        out = torch.as_tensor(module(x.numpy()))
        assert (out - ref).abs().max().item() <= 1e-4 * scale + 1e-6
    after = net.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "compile modified the user's model"
    return compiled


# ----------------------------------------------------------------------------------- the blocks
@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_block_through_default_pipeline_and_onnx(kind, tmp_path):
    act = {"inverted_residual": "hardswish", "groupnorm": "gelu", "layernorm": "silu"}.get(kind, "relu")
    net = randomize(ConvNet([(kind, 8, 1, act), (kind, 12, 2, act)], stem=8), seed=hash(kind) % 1000)
    x = torch.randn(2, 3, 11, 11)  # odd size: strided convs and pools meet the border unevenly
    check_net(net, x, qlfx.DEFAULT_PIPELINE, tmp_path)
    compiled = check_net(net, x, _all_equivalent_pipeline(), tmp_path, onnx=False)
    if kind.startswith(("repvgg", "mobileone", "acblock")) and "merge-parallel" in qlfx.list_passes():
        from blocks import count_convs

        # stem + one conv per parallel block (+ the 1x1 that adapts 8 -> 12 channels in front of the
        # second MobileOne block)
        assert count_convs(compiled.graph_module) == 1 + 2 + (1 if kind == "mobileone" else 0)


def test_squeeze_excitation_product_is_left_alone():
    """x * sigmoid(...) is a product with a nonlinear gate: no pass may turn it into a branch product."""
    net = randomize(nn.Sequential(ConvBN(4, 8, 3), SqueezeExcite(8), ConvBN(8, 8, 1)), seed=5)
    x = torch.randn(1, 4, 7, 7)
    compiled = qlfx.compile(net, _all_equivalent_pipeline(), (x,))
    gm = compiled.graph_module
    assert not any(ir.is_op(n, torch.ops.qlfx.branch_product) for n in gm.graph.nodes)
    gates = [n for n in gm.graph.nodes if ir.is_mul(n)]
    assert len(gates) == 1 and any(ir.is_op(a, aten.sigmoid) for a in gates[0].all_input_nodes)
    torch.testing.assert_close(compiled(x), net(x), atol=1e-5, rtol=1e-4)


def test_unsupported_ops_reported_all_at_once(tmp_path):
    reason = _onnx_available()
    if reason:
        pytest.skip(reason)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):  # three ops torch.onnx has no translation for
            y = torch.cummax(self.conv(x), dim=1)[0]
            y = torch.special.erfinv(torch.tanh(y))
            return torch.special.bessel_j0(y)

    net = Odd().eval()
    x = torch.randn(1, 3, 5, 5)
    compiled = qlfx.compile(net, qlfx.DEFAULT_PIPELINE, (x,))  # passes leave unknown ops alone
    with pytest.raises(UnsupportedOpsError) as info:
        compiled.to_onnx(tmp_path / "odd.onnx")
    message = str(info.value)
    assert len(info.value.sites) >= 3, message
    for name in ("cummax", "erfinv", "bessel_j0"):
        assert name in message
    assert not (tmp_path / "odd.onnx").exists()


def test_tvm_emission_matches_on_a_small_net(tmp_path):
    try:
        from qlfx.emit.tvm import build_tvm  # noqa: F401
    except ImportError as err:
        pytest.skip(f"TVM emitter not available: {err}")
    net = randomize(ConvNet([("repvgg", 8, 2, "relu"), ("bottleneck", 8, 1, "relu")], stem=4), seed=1)
    check_net(net, torch.randn(1, 3, 10, 10), _all_equivalent_pipeline(), tmp_path, onnx=False, tvm=True)


# --------------------------------------------------------------------------- property-based nets
block_spec = st.tuples(st.sampled_from(BLOCK_KINDS), st.sampled_from([4, 6, 8]), st.sampled_from([1, 2]),
                       st.sampled_from(ACTIVATIONS))


@st.composite
def random_nets(draw):
    """(model, input): a random block ConvNet or one of the two QLNet layouts, random BN statistics."""
    seed = draw(st.integers(0, 10_000))
    layout = draw(st.sampled_from(["blocks", "blocks", "qlnet", "qlnet-eq3"]))
    if layout == "blocks":
        spec = draw(st.lists(block_spec, min_size=1, max_size=3))
        net = ConvNet(spec, stem=draw(st.sampled_from([4, 8])), num_classes=3)
        size = draw(st.integers(6, 12))
    elif layout == "qlnet":
        widths = draw(st.sampled_from([(4, 8, 8, 16), (8, 8, 16, 16), (4, 4, 8, 8)]))
        net = qlnet(layers=(1, draw(st.integers(1, 2)), 1, 1), widths=widths, num_classes=3)
        size = draw(st.sampled_from([16, 20, 32]))
    else:
        widths = draw(st.sampled_from([(4, 8, 8, 16), (8, 8, 16, 16)]))
        net = qlnet_eq3(layers=(1, 1, draw(st.integers(1, 2)), 1), widths=widths, num_classes=3,
                        weight_sharing=draw(st.booleans()), expansion=draw(st.sampled_from([2, 4])),
                        activation=draw(st.sampled_from(["softball", "hardball", "hardtanh", "relu_all"])))
        size = draw(st.sampled_from([16, 24]))
    randomize(net, seed)
    gen = torch.Generator().manual_seed(seed)
    return net, torch.randn(draw(st.sampled_from([1, 2])), 3, size, size, generator=gen)


def property_examples(default: int) -> int:
    return int(os.environ.get("QLFX_PROPERTY_EXAMPLES", default))


@settings(max_examples=property_examples(12), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=random_nets())
def test_random_nets_keep_equivalence_and_emit(case, tmp_path_factory):
    net, x = case
    tmp = tmp_path_factory.mktemp("net")
    check_net(net, x, qlfx.DEFAULT_PIPELINE, tmp, onnx=True)
    check_net(net, x, _all_equivalent_pipeline(), tmp, onnx=False)


# --------------------------------------------------------------------- silent-wrong regressions
class SharedConvBNOnOnePath(nn.Module):
    """pytorch #197539: one conv module used on two paths, BN after only one. Folding the BN into the
    shared weight would change the other path."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 0.5)


def test_shared_conv_with_bn_on_one_path():
    net = randomize(SharedConvBNOnOnePath(), seed=1)
    x = torch.randn(1, 4, 6, 6)
    compiled = qlfx.compile(net, qlfx.DEFAULT_PIPELINE, (x,))
    torch.testing.assert_close(compiled(x), net(x), atol=1e-5, rtol=1e-4)
    skipped = [s for r in compiled.report.rows if r.result for s in r.result.skipped]
    assert any("also read by" in s.reason for s in skipped), [str(s) for s in skipped]


@pytest.mark.parametrize("form", ["linear_plus_scaled_bias", "addmm_beta", "conv_plus_scaled_bias"])
def test_scaled_bias_before_bn(form):
    """onnxscript #3027 (Gemm beta != 1 ignored when folding BN): y = W x + 0.5 b, then BN. The bias is
    scaled outside the linear op; folding must see 0.5 b, not b."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.bn1d = nn.BatchNorm1d(5)
            self.bn2d = nn.BatchNorm2d(5)

        def forward(self, x):
            if form == "linear_plus_scaled_bias":
                return self.bn1d(F.linear(x, self.fc.weight) + 0.5 * self.fc.bias)
            if form == "addmm_beta":
                return self.bn1d(torch.addmm(self.fc.bias, x, self.fc.weight.t(), beta=0.5))
            return self.bn2d(F.conv2d(x, self.conv.weight) + 0.5 * self.conv.bias.view(1, -1, 1, 1))

    net = randomize(M(), seed=2)
    x = torch.randn(4, 3, 6, 6) if form.startswith("conv") else torch.randn(4, 6)
    compiled = qlfx.compile(net, _all_equivalent_pipeline(), (x,))
    torch.testing.assert_close(compiled(x), net(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("padding,stride,dilation", [(1, 1, 1), (2, 2, 1), (2, 1, 2), (1, 2, 1)])
def test_bn_before_zero_padded_conv_is_exact_at_borders(padding, stride, dilation):
    """BN -> padded conv: fold-bn's rule 3. Padded pixels of BN(x) are 0, not the BN shift, so the shift's
    contribution differs at the border; check border pixels explicitly."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 4, 3, stride, padding, dilation)

        def forward(self, x):
            return self.conv(self.bn(x))

    net = randomize(M(), seed=3)
    x = torch.randn(2, 3, 9, 8)
    compiled = qlfx.compile(net, qlfx.DEFAULT_PIPELINE, (x,))
    assert not any(ir.is_op(n, aten.batch_norm) for n in compiled.graph_module.graph.nodes)
    ref, got = net(x), compiled(x)
    border = torch.zeros_like(ref, dtype=torch.bool)
    border[..., 0, :] = border[..., -1, :] = border[..., :, 0] = border[..., :, -1] = True
    torch.testing.assert_close(got[border], ref[border], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------- bad inputs
def _tiny():
    return randomize(ConvNet([("bottleneck", 8, 2, "relu")], stem=4), seed=4)


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def _untouched(net, state):
    return all(torch.equal(state[k], v) for k, v in net.state_dict().items()) and set(state) == set(net.state_dict())


def test_training_mode_is_refused_and_model_untouched():
    net = _tiny().train()
    state = _state(net)
    with pytest.raises(UsageError, match="training mode.*model.eval"):
        qlfx.compile(net, qlfx.DEFAULT_PIPELINE, (torch.randn(2, 3, 8, 8),))
    assert net.training and _untouched(net, state)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_are_refused(bad):
    net = _tiny()
    with torch.no_grad():
        net.blocks[0].conv2[0].weight[0, 0, 0, 0] = bad
        net.blocks[0].conv3[1].running_var[1] = bad
    state = _state(net)
    with pytest.raises(UsageError, match=r"NaN or Inf in .*blocks\.0\.conv2\.0\.weight.*running_var"):
        qlfx.compile(net, qlfx.DEFAULT_PIPELINE, (torch.randn(1, 3, 8, 8),))
    assert all(torch.equal(state[k], v) or (torch.isnan(state[k]) == torch.isnan(v)).all()
               for k, v in net.state_dict().items())


@pytest.mark.parametrize("inputs,match", [
    ((torch.randn(1, 5, 8, 8),), "fails on the example inputs.*5, 8, 8"),
    ((torch.randn(1, 3, 8),), "fails on the example inputs"),
    ((torch.randint(0, 4, (1, 3, 8, 8)),), "fails on the example inputs.*int64"),
    ((torch.randn(1, 3, 8, 8, dtype=torch.float64),), "fails on the example inputs.*float64"),
    (([[1.0, 2.0]],), "needs torch.Tensor inputs"),
    (None, "example_inputs is required"),
])
def test_wrong_example_inputs(inputs, match):
    net = _tiny()
    state = _state(net)
    with pytest.raises(UsageError, match=match):
        qlfx.compile(net, qlfx.DEFAULT_PIPELINE, inputs)
    assert _untouched(net, state)


def test_unknown_pass_suggests_closest():
    net = _tiny()
    with pytest.raises(qlfx.UnknownPassError, match="Did you mean 'constant-fold'"):
        qlfx.compile(net, "fold-bn,constant-fodl", (torch.randn(1, 3, 8, 8),))


def test_unwritable_output_path_leaves_nothing(tmp_path):
    reason = _onnx_available()
    if reason:
        pytest.skip(reason)
    net = _tiny()
    compiled = qlfx.compile(net, qlfx.DEFAULT_PIPELINE, (torch.randn(1, 3, 8, 8),))
    with pytest.raises(UsageError):
        compiled.to_onnx("/proc/qlfx-no-such-dir/m.onnx")
    (tmp_path / "out").mkdir()
    with pytest.raises((UsageError, IsADirectoryError, OSError)):
        compiled.to_onnx(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_corrupted_tuning_database_is_reported(tmp_path):
    try:
        from qlfx.kernels.tuning import RECORD_FILE, WORKLOAD_FILE, TuningDatabaseError, open_database
    except ImportError as err:
        pytest.skip(f"TVM tuning database API not available: {err}")
    (tmp_path / WORKLOAD_FILE).write_text('{"ok": 1}\n{"truncated": [1, 2\n')
    (tmp_path / RECORD_FILE).write_text("")
    with pytest.raises(TuningDatabaseError, match="corrupted.*line 2.*Delete it"):
        open_database(str(tmp_path))
    (tmp_path / "as_file").write_text("x")
    with pytest.raises(TuningDatabaseError, match="is a file"):
        open_database(str(tmp_path / "as_file"))


class _SilentlyScalesAWeight(Pass):
    """Reports no change but scales one weight in place: the generated code is the same as before,
    so only a check that also compares the weights can catch it."""

    name = "test-silent-weight-change"
    description = "test pass: changes a weight, claims nothing changed"
    contract = "equivalent"

    def run(self, gm, ctx):
        weight = next(v for _, v in list(gm.named_parameters()) + list(gm.named_buffers()) if v.dim() == 4)
        with torch.no_grad():
            weight.mul_(1.5)
        return PassResult(changed=False)


class _DoesNothing(Pass):
    name = "test-does-nothing"
    description = "test pass: leaves the graph as it is"
    contract = "exact"

    def run(self, gm, ctx):
        return PassResult(changed=False)


def test_a_weight_changed_behind_the_same_code_is_caught():
    with pytest.raises(qlfx.EquivalenceError, match="test-silent-weight-change"):
        qlfx.compile(_tiny(), [_SilentlyScalesAWeight()], (torch.randn(1, 3, 8, 8),))


def test_an_unchanged_program_reuses_the_reference_outputs(monkeypatch):
    import qlfx.pass_manager as pm

    runs = []
    real = pm.check_against
    monkeypatch.setattr(pm, "check_against", lambda *a, **k: runs.append(1) or real(*a, **k))
    compiled = qlfx.compile(_tiny(), [_DoesNothing(), "fold-bn", _DoesNothing()], (torch.randn(1, 3, 8, 8),))
    assert len(runs) == 2  # the capture check and fold-bn's; the no-op passes reused the outputs before them
    assert [row.check.passed and row.check.max_abs == 0.0 for row in compiled.report.rows
            if row.pass_name == "test-does-nothing"] == [True, True]
