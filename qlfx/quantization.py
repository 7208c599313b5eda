"""Int8 quantisation arithmetic for the ``quantize`` pass (passes/quantize.py) and for passes that
measure quantisation error (equalize, rotate): fake quantisation, observers, qparams.

Conventions (those of onnxruntime's QDQ int8 kernels, so the torch simulation and the ONNX model agree):

- weights: symmetric int8 per output channel (dim 0): scale_c = max|w_c| / 127, zero point 0,
  q = clamp(round(w / scale_c), -128, 127) (never below -127 with this scale), w_hat = q * scale_c;
- activations: asymmetric uint8 per tensor from a range [lo, hi] that always contains 0:
  scale = (hi - lo) / 255, zero_point = clamp(round(-lo / scale), 0, 255),
  x_hat = (clamp(round(x / scale) + zero_point, 0, 255) - zero_point) * scale;
- rounding is half to even (torch's fake_quantize ops and ONNX QuantizeLinear both use it).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from . import ir

__all__ = ["quantize_weight_per_channel", "quantize_tensor_per_tensor", "weight_scales", "activation_qparams",
           "quantize_bias", "RangeObserver", "ESTIMATORS", "is_quantized", "expand_branch_products", "linear_op",
           "fake_quantize_value", "fake_quantize_weight", "FAKE_QUANT_OPS", "has_vnni", "movement_source",
           "SELECTION_OPS", "ELEMENTWISE_INT8_OPS", "ABSORBED_ACTIVATIONS", "elementwise_operands",
           "absorbed_activation", "Int8Values", "int8_values"]

_INT32 = (-(2 ** 31), 2 ** 31 - 1)


def has_vnni() -> bool:
    """This CPU has VNNI (AVX-512 VNNI or AVX-VNNI): onnxruntime's u8 x s8 kernels then sum products in
    int32. Without it (plain AVX2 / AVX-512BW) they use vpmaddubsw, which adds PAIRS of u8 x s8 products
    in int16 and saturates when both exceed ~16384 (255 * 127 * 2 > 32767): full-range int8 weights then
    give wrong results, and 7-bit weights (``reduce_range``) cannot saturate (255 * 63 * 2 < 32767)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True  # not Linux on x86: no vpmaddubsw path to protect against
    if " avx2" not in flags:
        return True  # not x86 (ARM's dot-product kernels accumulate in int32)
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _signed_range(bits: int) -> tuple[int, int]:
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"bits must be between 2 and 16, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_scales(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-output-channel scales of ``w`` (dim 0): max|w_c| / (2^(bits-1) - 1), float32."""
    _, qmax = _signed_range(bits)
    amax = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1).float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))  # an all-zero channel stays zero at any scale


def quantize_weight_per_channel(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``w`` quantised symmetrically per output channel (dim 0) to ``bits`` and dequantised: the fp32
    weight an int8 kernel effectively multiplies with. Same dtype and shape as ``w``."""
    qmin, qmax = _signed_range(bits)
    scales = weight_scales(w, bits)
    zeros = torch.zeros_like(scales, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.detach().float(), scales, zeros, 0, min(qmin, -128),
                                                  max(qmax, 127)).to(w.dtype)


def activation_qparams(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """(scale, zero_point) of the asymmetric unsigned per-tensor grid covering [min(lo, 0), max(hi, 0)]."""
    qmax = 2 ** int(bits) - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / qmax if hi > lo else 1.0  # an all-zero tensor stays zero at any scale
    scale = float(torch.tensor(scale, dtype=torch.float32))  # the float32 value ONNX stores
    zero_point = int(min(max(round(-lo / scale), 0), qmax))
    return scale, zero_point


def quantize_tensor_per_tensor(x: torch.Tensor, scale: float, bits: int = 8, zero_point: int = 0) -> torch.Tensor:
    """``x`` quantised per tensor to the unsigned ``bits`` grid (scale, zero_point) and dequantised.
    With zero_point 0 that grid only holds [0, (2^bits - 1) * scale]: pass the zero point of
    :func:`activation_qparams` for signed data."""
    qmax = 2 ** int(bits) - 1
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), 0, qmax)


def quantize_bias(bias: torch.Tensor, input_scale: float, weight_scales: torch.Tensor) -> torch.Tensor:
    """``bias`` rounded to the int32 grid of an int8 kernel's accumulator, step s_x * s_w per output
    channel, and dequantised (float32 arithmetic, as onnxruntime's DequantizeLinear computes it)."""
    step = (torch.tensor(float(input_scale), dtype=torch.float32) * weight_scales.float()).float()
    q = torch.clamp(torch.round(bias.detach().float() / step), *_INT32)  # torch.round: half to even
    return (q * step).to(bias.dtype)


# ----------------------------------------------------------------------------------------- observers
ESTIMATORS = ("minmax", "percentile", "mse")
_SAMPLES_PER_CHUNK = 1 << 16  # values kept per observed tensor and calibration chunk (percentile, mse)
_SAMPLES_TOTAL = 1 << 20
_MSE_SAMPLES = 1 << 15  # entries the MSE estimator scores its candidate ranges on


class RangeObserver:
    """The range of one value over the calibration data: its exact min and max, and a seeded uniform
    subsample of its entries (for the percentile and MSE estimators)."""

    def __init__(self, seed: int = 0):
        self.lo, self.hi = math.inf, -math.inf
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.generator = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        if self.kept >= _SAMPLES_TOTAL:
            return
        if flat.numel() > _SAMPLES_PER_CHUNK:
            flat = flat[torch.randint(flat.numel(), (_SAMPLES_PER_CHUNK,), generator=self.generator)]
        self.samples.append(flat.clone())
        self.kept += flat.numel()

    def range(self, estimator: str, percentile: float = 99.99, bits: int = 8) -> tuple[float, float]:
        """The [lo, hi] the activation grid covers, by ``estimator``:

        - ``minmax``: the observed min and max (nothing clipped; one outlier sets the step);
        - ``percentile``: the ``100 - p`` and ``p`` percentiles of the subsample (clips the tails);
        - ``mse``: [a lo, a hi] for the a in (0, 1] minimising the mean squared fake-quantisation error
          of the subsample (rounding error against clipping error).
        """
        if self.lo > self.hi:
            raise ValueError("no calibration data was observed")
        if estimator == "minmax" or self.lo == self.hi:
            return self.lo, self.hi
        samples = torch.cat(self.samples)
        if estimator == "percentile":
            q = torch.tensor([(100.0 - percentile) / 100.0, percentile / 100.0])
            lo, hi = torch.quantile(samples.double(), q.double()).tolist()
            return min(lo, self.hi), max(hi, self.lo)
        if estimator == "mse":
            if samples.numel() > _MSE_SAMPLES:  # all 96 candidates at once on a seeded subsample
                samples = samples[torch.randint(samples.numel(), (_MSE_SAMPLES,), generator=self.generator)]
            factors = torch.linspace(1.0, 0.05, 96).tolist()
            grids = [activation_qparams(a * self.lo, a * self.hi, bits) for a in factors]
            scale = torch.tensor([g[0] for g in grids]).unsqueeze(1)
            zero = torch.tensor([float(g[1]) for g in grids]).unsqueeze(1)
            q = torch.clamp(torch.round(samples.unsqueeze(0) / scale) + zero, 0, 2 ** int(bits) - 1)
            errors = ((q - zero) * scale - samples.unsqueeze(0)).pow(2).mean(dim=1)
            a = factors[int(torch.argmin(errors))]  # the first (widest) of equal minima
            return a * self.lo, a * self.hi
        raise ValueError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")


# ------------------------------------------------------------------------------------ graph pieces
aten = torch.ops.aten
FAKE_QUANT_OPS = (aten.fake_quantize_per_tensor_affine.default, aten.fake_quantize_per_channel_affine.default)


def is_quantized(gm: fx.GraphModule) -> bool:
    """The graph holds fake quantisation (the ``quantize`` pass ran): its ONNX form is an int8 QDQ model."""
    return any(n.op == "call_function" and n.target in FAKE_QUANT_OPS for n in gm.graph.nodes)


def expand_branch_products(gm: fx.GraphModule) -> list[str]:
    """Replace every ``qlfx::branch_product`` by its definition, two ``aten.conv2d`` and an ``aten.mul``
    (exact: the op's own reference), so each branch is a conv an int8 kernel runs. Returns the sites."""
    sites = []
    for node in list(gm.graph.nodes):
        if not ir.is_op(node, torch.ops.qlfx.branch_product.default):
            continue
        x, wa, ba, wb, bb, stride, padding_b, dilation_b, groups_b = node.args
        with gm.graph.inserting_before(node):
            a = ir.call(gm, aten.conv2d.default, (x, wa, ba, list(stride), [0, 0], [1, 1], 1), like=node)
            b = ir.call(gm, aten.conv2d.default, (x, wb, bb, list(stride), list(padding_b), list(dilation_b),
                                                  int(groups_b)), like=node)
            product = ir.call(gm, aten.mul.Tensor, (a, b), like=node)
        ir.replace_value(node, product)
        gm.graph.erase_node(node)
        sites.append(node.name)
    return sites


# ops that only move, copy or drop nothing of their input's entries: a per-tensor quantiser commutes with them
MOVEMENT_OPS = (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.view.default,
                aten.reshape.default, aten._unsafe_view.default, aten.permute.default, aten.transpose.int,
                aten.repeat.default, aten.repeat_interleave.self_int, aten.index_select.default, aten.clone.default,
                aten.flatten.using_ints, aten.contiguous.default)


# ops that select entries of their input (max pooling): a per-tensor quantiser is monotone, so it
# commutes with them too (max of quantised entries = quantised max), and onnxruntime runs them on uint8
SELECTION_OPS = (aten.max_pool2d.default, aten.max_pool1d.default, aten.max_pool3d.default)


def movement_source(value: fx.Node) -> fx.Node | None:
    """The value a chain of :data:`MOVEMENT_OPS` / :data:`SELECTION_OPS` ending at ``value`` starts from
    (None: no such chain). Quantising it with ``value``'s grid is the same function (quantising the
    chain's output again on that grid changes nothing), and lets onnxruntime run the op that makes it (a
    branch product before a channel repeat, a conv before a max pool) in int8 too, and the chain on
    uint8 (it drops the DequantizeLinear -> op -> QuantizeLinear around each op of one grid)."""
    source = value
    while source.op == "call_function" and source.target in MOVEMENT_OPS + SELECTION_OPS \
            and isinstance(source.args[0], fx.Node):
        source = source.args[0]
    return None if source is value or source.op != "call_function" else source


# elementwise ops onnxruntime runs in int8 (QLinearAdd / QLinearMul) when their inputs are dequantised
# and their output quantised
ELEMENTWISE_INT8_OPS = (aten.add.Tensor, aten.mul.Tensor)
# activations an int8 kernel applies by saturating its output: with the output grid's zero point at the
# bottom of the uint8 range (a range [0, hi]) ``relu`` then quantise = quantise, and onnxruntime drops the
# Relu between the op and its QuantizeLinear (ReluQuantFusion)
ABSORBED_ACTIVATIONS = (aten.relu.default, aten.relu_.default)


def elementwise_operands(node: fx.Node) -> "list[fx.Node] | None":
    """The two tensor operands of an ``aten.add`` / ``aten.mul`` an int8 kernel can run (QLinearAdd /
    QLinearMul: two float tensors, alpha 1, at least 2-D); None for any other node."""
    if node.op != "call_function" or node.target not in ELEMENTWISE_INT8_OPS or len(node.args) != 2:
        return None
    if node.kwargs.get("alpha", 1) != 1 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    values = [node.meta.get("val"), *(a.meta.get("val") for a in node.args)]
    if not all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.dim() >= 2 for v in values):
        return None
    return list(node.args)


def absorbed_activation(node: fx.Node) -> "fx.Node | None":
    """The ``relu`` that is the only reader of ``node`` (an int8 op's output): the int8 op's output value
    is then that relu's (its grid [0, hi] has zero point 0, which saturates as the relu does)."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in ABSORBED_ACTIVATIONS \
            and users[0].args[0] is node:
        return users[0]
    return None


def linear_op(node: fx.Node) -> "ir.ConvCall | ir.LinearCall | None":
    """The conv2d / linear view of a node an int8 kernel can run: stored weight and bias (or none)."""
    view = ir.ConvCall.of(node) or ir.LinearCall.of(node)
    if view is None or not ir.is_constant(view.weight) or not (view.bias is None or ir.is_constant(view.bias)):
        return None
    if isinstance(view, ir.ConvCall) and isinstance(view.padding, str):
        return None
    return view


class Int8Values:
    """What runs in int8 around the linear ops ``ops`` (:func:`int8_values`): ``values`` -- the activations
    on a per-tensor grid, name -> node in graph order; ``written`` -- those an int8 op writes (its output,
    or the relu it absorbs); ``elementwise`` -- the adds / muls that run in int8 (QLinearAdd / QLinearMul)."""

    def __init__(self, values: dict[str, fx.Node], written: set[fx.Node], elementwise: list[fx.Node]):
        self.values, self.written, self.elementwise = values, written, elementwise

    def on_grid(self, value: fx.Node) -> bool:
        """Quantised itself, or made by moving / selecting the entries of a quantised value."""
        root = movement_source(value)
        return value.name in self.values or (root is not None and root.name in self.values)


def int8_values(graph: fx.Graph, ops: "list[fx.Node]") -> Int8Values:
    """The values the ``quantize`` pass puts on per-tensor grids when it runs ``ops`` (convs / linears with
    stored weights) in int8: each op's input and output (after a relu it absorbs), then every add / mul
    whose operands are all on a grid -- its operands and output too -- grown to a fixed point (a residual
    add, a branch product)."""
    values: dict[str, fx.Node] = {}
    written: set[fx.Node] = set()
    for node in ops:
        values.setdefault(linear_op(node).input.name, linear_op(node).input)
        output = absorbed_activation(node) or node
        values.setdefault(output.name, output)
        written.add(output)
    found = Int8Values(values, written, [])
    grown = True
    while grown:
        grown = False
        for node in graph.nodes:
            operands = elementwise_operands(node)
            if node in found.elementwise or operands is None or not all(found.on_grid(o) for o in operands):
                continue
            found.elementwise.append(node)
            for operand in operands:
                values.setdefault(operand.name, operand)
            output = absorbed_activation(node) or node
            values.setdefault(output.name, output)
            written.add(output)
            grown = True
    found.values = {n.name: n for n in graph.nodes if n.name in values}  # graph order
    return found


def fake_quantize_value(gm: fx.GraphModule, value: fx.Node, scale: float, zero_point: int, bits: int = 8,
                        users: "set[fx.Node] | None" = None) -> fx.Node:
    """Insert ``aten.fake_quantize_per_tensor_affine(value)`` after ``value`` and make every user of
    ``value`` (or only those in ``users``) read it; return the new node."""
    with gm.graph.inserting_after(value):
        node = ir.call(gm, aten.fake_quantize_per_tensor_affine.default,
                       (value, float(scale), int(zero_point), 0, 2 ** bits - 1), like=value)
    if users is None:
        ir.replace_value(value, node)
    else:
        node.meta[ir.VALUE_OF] = ir.value_key(value)
        value.replace_all_uses_with(node, delete_user_cb=lambda user: user in users)
    return node


def fake_quantize_weight(gm: fx.GraphModule, view, input_scale: float, bits: int = 8) -> torch.Tensor:
    """Make ``view``'s op read ``aten.fake_quantize_per_channel_affine(weight)`` (symmetric per output
    channel, ``bits`` <= 8 of an int8: 7 is onnxruntime's ``reduce_range``) and a bias rounded to the
    int32 accumulator grid (:func:`quantize_bias`). New constants: the stored weight and bias are not
    changed. Returns the weight scales."""
    weight = ir.get_tensor(gm, view.weight)
    scales = weight_scales(weight, bits)
    qmin, qmax = -128, 127  # the int8 storage (the ONNX export needs this range); |q| <= 2^(bits-1) - 1
    node = view.node
    with gm.graph.inserting_before(node):
        scale_node = ir.constant_node(gm, scales, f"{node.name}_weight_scale")
        zero_node = ir.constant_node(gm, torch.zeros(scales.shape, dtype=torch.int32), f"{node.name}_weight_zero_point")
        weight_node = ir.call(gm, aten.fake_quantize_per_channel_affine.default,
                              (view.weight, scale_node, zero_node, 0, qmin, qmax), like=node)
        bias = view.bias
        if bias is not None:
            bias = ir.constant_node(gm, quantize_bias(ir.get_tensor(gm, bias), input_scale, scales),
                                    f"{node.name}_bias_int32_grid")
    view.set_args(weight=weight_node, bias=bias)
    return scales
