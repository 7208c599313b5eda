"""quantize: int8 fake-quant simulation in torch, and the int8 QDQ ONNX model onnxruntime runs."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qlfx
import qlfx.passes.quantize  # noqa: F401  (registers the pass)
from qlfx import ir
from qlfx.emit.onnx import QUANTIZED_TOLERANCE, to_onnx_model
from qlfx.errors import EquivalenceError, UsageError
from qlfx.models import create_model, randomize_batchnorm
from qlfx.quantization import (RangeObserver, activation_qparams, is_quantized, quantize_bias,
                               quantize_tensor_per_tensor, quantize_weight_per_channel, weight_scales)
from qlfx.verify import run_outputs
from tests.authors_resnet import authors_resnet
from tests.blocks import one_torch_thread, randomize, small_convnet  # noqa: F401  (fixture)

aten = torch.ops.aten
DEFAULT_THEN_QUANTIZE = "fold-bn,merge-parallel,constant-fold,dce,fuse-product,expand-depthwise,quantize<budget=0.5{}>"


class ConvChain(nn.Module):
    """conv3x3 -> BN -> conv1x1 -> linear head; small enough to simulate by hand."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.conv2(self.bn(self.conv1(x))).mean((2, 3)))


def _conv_chain():
    return randomize(ConvChain(), seed=3)


def _data(n=16, shape=(3, 8, 8), seed=0):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ the math
def test_weight_quantisation_is_per_channel_symmetric_and_within_half_a_step():
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 9).view(8, 1, 1, 1)
    w_hat = quantize_weight_per_channel(w)
    scales = weight_scales(w)
    assert torch.allclose(scales, w.reshape(8, -1).abs().amax(1) / 127)
    steps = w_hat / scales.view(8, 1, 1, 1)
    assert torch.allclose(steps, steps.round(), atol=1e-4)  # every weight on its channel's grid
    assert ((w_hat - w).abs() <= scales.view(8, 1, 1, 1) / 2 + 1e-7).all()
    assert torch.allclose(w_hat.reshape(8, -1).abs().amax(1), w.reshape(8, -1).abs().amax(1))  # max kept
    assert (quantize_weight_per_channel(torch.zeros(2, 3)) == 0).all()  # a zero channel stays zero


def test_activation_grid_holds_zero_and_clips_outside_the_range():
    scale, zero = activation_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zero == 64
    x = torch.tensor([0.0, -5.0, 5.0, 1.2345])
    x_hat = quantize_tensor_per_tensor(x, scale, zero_point=zero)
    assert x_hat[0] == 0  # padding and ReLU zeros are exact
    assert x_hat[1] == pytest.approx(-64 * scale) and x_hat[2] == pytest.approx(191 * scale)
    assert abs(x_hat[3] - 1.2345) <= scale / 2
    b = torch.tensor([0.1234, -2.0])
    b_hat = quantize_bias(b, 0.01, torch.tensor([0.001, 0.002]))
    assert torch.allclose(b_hat, torch.tensor([0.12340, -2.0]), atol=1e-6)
    assert torch.allclose(b_hat / torch.tensor([1e-5, 2e-5]), (b_hat / torch.tensor([1e-5, 2e-5])).round(), atol=1e-3)


def test_estimators_clip_an_outlier_that_minmax_keeps():
    observer = RangeObserver(seed=0)
    x = torch.randn(20000, generator=torch.Generator().manual_seed(2))
    x[0] = 60.0  # one outlier
    observer.observe(x)
    assert observer.range("minmax") == (pytest.approx(float(x.min())), 60.0)
    lo_p, hi_p = observer.range("percentile", 99.9)
    assert hi_p < 5 and lo_p < 0
    # one far outlier costs mse more clipped than kept; at 4 bits the step is coarse enough that mse clips
    # a Gaussian's tails (the MSE-optimal 4-bit clip is about 2.5 sigma; the max of 20000 samples is ~4)
    x = torch.randn(20000, generator=torch.Generator().manual_seed(3))
    observer = RangeObserver(seed=0)
    observer.observe(x)
    lo_m, hi_m = observer.range("mse", bits=4)
    assert -3.2 < lo_m < -2.0 and 2.0 < hi_m < 3.2, (lo_m, hi_m)

    def mse(lo, hi):
        scale, zero = activation_qparams(lo, hi, bits=4)
        return float((quantize_tensor_per_tensor(x, scale, bits=4, zero_point=zero) - x).pow(2).mean())

    assert mse(lo_m, hi_m) < 0.7 * mse(*observer.range("minmax"))


# ------------------------------------------------------------------------------------------- the pass
def test_graph_is_the_hand_written_int8_simulation():
    """The quantised graph = conv/linear on fake-quantised inputs, per-channel weights, int32-grid biases,
    with every conv/linear output fake-quantised, using the ranges the pass reports (random weights and
    random BN statistics; the BN is folded first)."""
    model, x, calibration = _conv_chain(), _data(4), _data(16, seed=1)
    compiled = qlfx.compile(model, "fold-bn,quantize<budget=0.5,estimator=minmax,reduce_range=false>",
                            example_inputs=(x,), calibration=calibration)
    gm = compiled.graph_module
    qparams = compiled.report.rows[-1].result.stats["qparams"]
    assert compiled.report.rows[-1].result.stats["ops"] == 3

    conv1, conv2, fc = (n for n in gm.graph.nodes if ir.is_op(n, aten.conv2d.default, aten.linear.default))
    names = [ir.op_args(n)["input"].args[0].name for n in (conv1, conv2, fc)]  # the observed inputs
    fq = {k: (lambda t, k=k: quantize_tensor_per_tensor(t, qparams[k]["scale"], zero_point=qparams[k]["zero_point"]))
          for k in qparams}
    # the folded conv1 (BN inside) from the fp32 graph the pass started from
    folded = qlfx.compile(model, "fold-bn", example_inputs=(x,)).graph_module
    f1, f2, ff = (n for n in folded.graph.nodes if ir.is_op(n, aten.conv2d.default, aten.linear.default))

    def layer(node, inp, fn, **kw):
        a = ir.op_args(node)
        w, b = ir.get_tensor(folded, a["weight"]), ir.get_tensor(folded, a["bias"])
        s_x = qparams[inp]["scale"]
        return fn(fq[inp](values[inp]), quantize_weight_per_channel(w), quantize_bias(b, s_x, weight_scales(w)), **kw)

    values = {names[0]: x}
    values[conv1.name] = y1 = fq[conv1.name](layer(f1, names[0], F.conv2d, padding=1))
    values[conv2.name] = fq[conv2.name](layer(f2, conv1.name, F.conv2d))
    values[names[2]] = values[conv2.name].mean((2, 3))
    expected = fq[fc.name](layer(ff, names[2], F.linear))
    assert y1 is not None and names[1] == conv1.name
    got = run_outputs(gm, (x,))[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - model(x)).abs().max() > 1e-4  # it did quantise


def test_user_model_is_not_changed_and_is_quantized_says_so():
    model, x = _conv_chain(), _data(4)
    before = copy.deepcopy(model.state_dict())
    compiled = qlfx.compile(model, "fold-bn,quantize<budget=0.5>", example_inputs=(x,), calibration=_data(8))
    assert is_quantized(compiled.graph_module)
    assert not is_quantized(qlfx.compile(model, "fold-bn", example_inputs=(x,)).graph_module)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_too_tight_budget_is_caught_and_names_quantize():
    model, x = _conv_chain(), _data(4)
    with pytest.raises(EquivalenceError) as err:
        qlfx.compile(model, "fold-bn,quantize<budget=1e-6>", example_inputs=(x,), calibration=_data(8))
    assert err.value.pass_name == "quantize" and "quantize" in str(err.value)


def test_accuracy_budget_is_checked_on_labelled_calibration():
    model, x = _conv_chain(), _data(4)
    calibration = _data(64, seed=4)
    labels = model(calibration).argmax(1)  # the fp32 model is 100 % right on them
    compiled = qlfx.compile(model, "fold-bn,quantize<accuracy_drop=10>", example_inputs=(x,),
                            calibration=calibration, labels=labels)
    accuracy = compiled.report.rows[-1].check.accuracy
    assert accuracy is not None and accuracy.before - accuracy.after <= 10
    # ranges clipped to the 49th..51st percentiles: activations collapse, predictions flip, a zero drop breaks
    with pytest.raises(EquivalenceError) as err:
        qlfx.compile(model, "fold-bn,quantize<accuracy_drop=0,estimator=percentile,percentile=51>",
                     example_inputs=(x,), calibration=calibration, labels=labels)
    assert err.value.pass_name == "quantize" and "quantize" in str(err.value)
    assert err.value.check.accuracy.after < err.value.check.accuracy.before  # it was the accuracy that broke


def test_skip_first_last_and_patterns_keep_fp32():
    model, x = _conv_chain(), _data(4)
    compiled = qlfx.compile(model, "fold-bn,quantize<budget=0.5,skip=first/last>", example_inputs=(x,),
                            calibration=_data(8))
    result = compiled.report.rows[-1].result
    assert result.stats["ops"] == 1
    assert sorted(s.site for s in result.skipped) == sorted(["conv1", "fc"]), result.skipped
    compiled = qlfx.compile(model, "fold-bn,quantize<budget=0.5,skip=conv2>", example_inputs=(x,),
                            calibration=_data(8))
    assert [s.site for s in compiled.report.rows[-1].result.skipped] == ["conv2"]


class TwoReaders(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_an_fp32_exception_reads_the_unquantised_input_its_quantised_sibling_shares():
    model, x = randomize(TwoReaders(), seed=4), _data(4)
    compiled = qlfx.compile(model, "quantize<budget=0.5,skip=b>", example_inputs=(x,), calibration=_data(8))
    gm = compiled.graph_module
    conv_a, conv_b = (n for n in gm.graph.nodes if ir.is_op(n, aten.conv2d.default))
    assert ir.is_op(ir.op_args(conv_a)["input"], aten.fake_quantize_per_tensor_affine.default)
    assert ir.op_args(conv_b)["input"].op == "placeholder" and ir.is_constant(ir.op_args(conv_b)["weight"])
    expected = F.conv2d(x, model.b.weight, model.b.bias, padding=1)  # b in fp32 on the fp32 input
    qa = run_outputs(gm, (x,))[0] - expected  # what is left is a's int8 output, on its grid, iff b was fp32
    scale = compiled.report.rows[-1].result.stats["qparams"][conv_a.name]["scale"]
    assert (qa - model.a(x)).abs().max() > 1e-5  # a is quantised
    torch.testing.assert_close(qa / scale, (qa / scale).round(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("options, message", [
    ("estimator=median", "estimator must be one of"),
    ("percentile=7", "percentile must be"),
    ("reduce_range=maybe", "reduce_range must be"),
])
def test_bad_options_say_what_is_wrong(options, message):
    with pytest.raises(UsageError, match=message):
        qlfx.compile(_conv_chain(), f"fold-bn,quantize<budget=0.5,{options}>", example_inputs=(_data(4),),
                     calibration=_data(8))


def test_without_calibration_or_budget_it_says_what_to_pass():
    with pytest.raises(UsageError, match="calibration"):
        qlfx.compile(_conv_chain(), "fold-bn,quantize<budget=0.5>", example_inputs=(_data(4),))
    with pytest.raises(UsageError, match="budget"):
        qlfx.compile(_conv_chain(), "fold-bn,quantize", example_inputs=(_data(4),), calibration=_data(8))


# ------------------------------------------------------------------------------------ ONNX / onnxruntime
def _ort_outputs(proto, x, optimized_path=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def _stored_int8_weights(proto):
    """int8 initializers that a DequantizeLinear reads as its data (not its zero point)."""
    int8 = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    return [n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8]


def _check_int8_onnx(model, x, calibration, tmp_path, estimator="mse", min_fused=1):
    compiled = qlfx.compile(model, DEFAULT_THEN_QUANTIZE.format(f",estimator={estimator}"), example_inputs=(x,),
                            calibration=calibration)
    proto = to_onnx_model(compiled.graph_module, (x,))
    assert len(_stored_int8_weights(proto)) == compiled.report.rows[-1].result.stats["ops"]
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in {t.name for t in proto.graph.initializer}
                   for n in proto.graph.node)
    optimized = tmp_path / "optimized.onnx"
    for inputs in (x, calibration[: x.shape[0]]):
        got = _ort_outputs(proto, inputs, optimized)[0]
        ref = run_outputs(compiled.graph_module, (inputs,))[0].numpy()
        error = np.abs(got - ref).max() / np.abs(ref).max()
        assert error <= QUANTIZED_TOLERANCE, error
    fused = [n.op_type for n in onnx.load(str(optimized)).graph.node if n.op_type.startswith(("QLinear", "QGemm"))]
    assert len(fused) >= min_fused, fused
    return compiled, fused


def test_stored_int8_weights_are_the_simulations_integers():
    """Each int8 weight the ONNX model stores is exactly the integer torch's fake quantisation rounded to
    (float32 w * (1 / scale); w / scale rounds some ties the other way). Weights with many entries on
    exact ties of the grid make the two roundings differ."""
    from qlfx.emit.onnx import store_quantized_constants

    torch.manual_seed(11)
    scale = torch.rand(64) * 0.02 + 0.005
    w = (torch.randint(-100, 100, (64, 512)) + 0.5) * scale[:, None]  # ties, up to float rounding
    w = w * (1 + 1e-7 * torch.randn(64, 512))
    w_node = onnx.numpy_helper.from_array(w.numpy(), "w")
    s_node = onnx.numpy_helper.from_array(scale.numpy(), "s")
    z_node = onnx.numpy_helper.from_array(np.zeros(64, np.int8), "z")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], axis=0),
         onnx.helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["y"], axis=0)],
        "g", [], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 512])],
        initializer=[w_node, s_node, z_node])
    proto = store_quantized_constants(onnx.helper.make_model(graph))
    (stored,) = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == "wq"]
    fake = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(64, dtype=torch.int32), 0, -128, 127)
    expected = torch.round(fake / scale[:, None]).to(torch.int8).numpy()
    divided = np.clip(np.rint(w.numpy() / scale.numpy()[:, None]), -128, 127).astype(np.int8)
    assert (divided != expected).any()  # the case is sharp: dividing would store other integers
    assert np.array_equal(stored, expected)


def test_int8_onnx_runs_int8_kernels_in_onnxruntime_and_matches_the_simulation(tmp_path):
    """Zoo QLNet (PDEBlocks with fused branch products, random BN statistics): ORT fuses QLinearConv and
    QLinearMul and agrees with the torch simulation within QUANTIZED_TOLERANCE."""
    model = randomize_batchnorm(create_model("qlnet-tiny"), seed=5).eval()
    x = _data(2, (3, 32, 32), seed=6)
    compiled, fused = _check_int8_onnx(model, x, _data(8, (3, 32, 32), seed=7), tmp_path, estimator="percentile",
                                       min_fused=10)
    assert "QLinearMul" in fused and "QLinearConv" in fused and "QLinearAdd" in fused
    assert any("branch_product replaced" in n for n in compiled.report.rows[-1].result.notes)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    # the channel repeats run as Tile on uint8 (no Expand, no fp32 residual adds or relus left)
    assert "Tile" in ops and not {"Expand", "Add", "Relu", "Conv"} & set(ops), ops


@pytest.mark.parametrize("make", [lambda: randomize(authors_resnet((1, 1, 1, 1), 10, (8, 16, 32, 64)), seed=8),
                                  pytest.param(small_convnet, marks=pytest.mark.slow)],
                         ids=["authors-resnet", "small-convnet"])
def test_int8_onnx_on_models_this_file_did_not_write(make, tmp_path):
    model = make()
    shape = (3, 32, 32) if isinstance(model, type(authors_resnet((1, 1, 1, 1), 10, (8, 16, 32, 64)))) else (3, 8, 8)
    _check_int8_onnx(model, _data(2, shape, seed=9), _data(8, shape, seed=10), tmp_path, estimator="minmax")


def test_compiled_to_onnx_writes_the_int8_model(tmp_path):
    model, x = _conv_chain(), _data(4)
    compiled = qlfx.compile(model, "fold-bn,quantize<budget=0.5>", example_inputs=(x,), calibration=_data(8))
    path = compiled.to_onnx(tmp_path / "m.onnx")  # checked in onnxruntime within QUANTIZED_TOLERANCE
    proto = onnx.load(str(path))
    assert len(_stored_int8_weights(proto)) == 3
    int32 = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT32}
    assert sum(n.op_type == "DequantizeLinear" and n.input[0] in int32 for n in proto.graph.node) == 3  # biases


class ResidualRelu(nn.Module):
    """A ResNet-style net: conv-BN-relu stem, max pool, two residual blocks (relu after the add), a
    branch product (conv * conv), a linear head: every value between int8 ops."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = torch.relu(x + self.block1(x))
        x = x + self.a(x) * self.b(x)
        return self.fc(x.mean((2, 3)))


def test_relu_max_pool_adds_and_products_run_in_int8_without_requantising(tmp_path):
    """The relu after an int8 op is absorbed into its output grid (zero point 0), a max pool keeps its
    input's grid, residual adds and products are quantised ops: onnxruntime runs the whole net on uint8
    (QLinearConv / QLinearAdd / QLinearMul / uint8 MaxPool), with one QuantizeLinear for the input and
    one for the pooled features, and agrees with the simulation."""
    model, x = randomize(ResidualRelu(), seed=11), _data(2, (3, 16, 16), seed=12)
    compiled = qlfx.compile(model, "fold-bn,quantize<budget=0.5,estimator=mse>", example_inputs=(x,),
                            calibration=_data(8, (3, 16, 16), seed=13))
    gm = compiled.graph_module
    for relu in (n for n in gm.graph.nodes if ir.is_op(n, aten.relu.default)):
        assert ir.is_op(relu.args[0], aten.conv2d.default, aten.add.Tensor)  # reads the int8 op's output
        (fq,) = relu.users
        assert ir.is_op(fq, aten.fake_quantize_per_tensor_affine.default) and fq.args[2] == 0
    pool = next(n for n in gm.graph.nodes if ir.is_op(n, aten.max_pool2d.default))
    assert ir.is_op(pool.args[0], aten.fake_quantize_per_tensor_affine.default)
    assert [tuple(u.args[1:3]) for u in pool.users] == [tuple(pool.args[0].args[1:3])]  # one grid
    for node in gm.graph.nodes:
        if ir.is_op(node, aten.add.Tensor, aten.mul.Tensor):
            assert all(ir.is_op(a, aten.fake_quantize_per_tensor_affine.default) for a in node.args), node
    proto = to_onnx_model(gm, (x,))
    optimized = tmp_path / "optimized.onnx"
    got = _ort_outputs(proto, x, optimized)[0]
    ref = run_outputs(gm, (x,))[0].numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() <= QUANTIZED_TOLERANCE
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert not {"Relu", "Add", "Mul", "Conv", "Gemm"} & set(ops), ops
    assert ops.count("QLinearAdd") == 2 and ops.count("QLinearMul") == 1 and ops.count("QLinearConv") == 5, ops
    assert ops.count("QuantizeLinear") == 2, ops  # the input, and the mean the classifier reads


def test_tiled_channel_repeats_compute_the_same_numbers(monkeypatch):
    """tile_channel_repeats renumbers channels between a depthwise conv and the dense convs after it:
    onnxruntime's output is bit-for-bit that of the model with the Unsqueeze -> Expand -> Reshape repeat."""
    import qlfx.emit.onnx as emit_onnx

    model = randomize_batchnorm(create_model("qlnet-tiny"), seed=5).eval()
    x = _data(2, (3, 32, 32), seed=6)
    compiled = qlfx.compile(model, DEFAULT_THEN_QUANTIZE.format(""), example_inputs=(x,),
                            calibration=_data(8, (3, 32, 32), seed=7))
    tiled = to_onnx_model(compiled.graph_module, (x,))
    monkeypatch.setattr(emit_onnx, "tile_channel_repeats", lambda proto: proto)
    plain = to_onnx_model(compiled.graph_module, (x,))
    count = lambda proto, op: sum(n.op_type == op for n in proto.graph.node)  # noqa: E731
    assert count(tiled, "Tile") == count(plain, "Expand") > 0 and count(tiled, "Expand") == 0
    for inputs in (x, _data(2, (3, 32, 32), seed=8)):
        np.testing.assert_array_equal(_ort_outputs(tiled, inputs)[0], _ort_outputs(plain, inputs)[0])
