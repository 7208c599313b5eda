"""ONNX emitter: the qlfx IR -> ``torch.export`` ExportedProgram -> ``torch.onnx.export`` (dynamo exporter).

The rewritten GraphModule is re-exported (:func:`qlfx.capture.to_exported_program`, symbolic batch when
the graph was captured with ``dynamic_batch``) and converted by torch.onnx with its own decompositions
and torchlib translations; only qlfx's own ops get translations here (``custom_translation_table``),
each one node of the ``qlfx`` domain backed by a model-local ONNX function of standard ops, so any ONNX
runtime runs it and a backend that knows it can match it by name:

- ``qlfx.BranchProduct(X, Wa, Ba, Wb, Bb)`` <strides, pads_b, dilations_b, group_b>
  = ``Mul(Conv(X, Wa, Ba, strides), Conv(X, Wb, Bb, strides, pads_b, dilations_b, group_b))``
  (``torch.ops.qlfx.branch_product``, see :mod:`qlfx.ops`; a missing bias is passed as zeros). With a
  depthwise b branch that has a channel multiplier m (Eq.(3): M = m C outputs, groups C) it is
  ``qlfx.BranchProductRepeat(X, Wa, Ba, Wb, Bb, RepeatIndex)``: b reads ``Gather(X, RepeatIndex, axis=1)``
  (every channel repeated m times) through a pure depthwise conv, group_b = M — the same sums
  (see passes/expand_depthwise.py), and runtimes have fast kernels for pure depthwise convs only;
- ``qlfx.Hardball(X)`` <radius> = ``X * r / max(|X|, r)``, |X| the L2 norm over axis 1;
- ``qlfx.Softball(X)`` <radius> = ``X / sqrt(1 + |X|^2 / r^2)``; radius = the op's radius or sqrt(C).

A graph the ``quantize`` pass made (``aten.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``,
which torchlib exports as QuantizeLinear -> DequantizeLinear) becomes an int8 QDQ model:
:func:`store_quantized_constants` stores the quantised weights as int8 and the biases as int32, the
form onnxruntime fuses into QLinearConv / QGemm / QLinearMul / QLinearAdd, and
:func:`tile_channel_repeats` turns expand-depthwise's channel repeats into ``Tile`` (channels renumbered
between the two convs around it) so onnxruntime keeps them on its NHWC int8 path.

Why functions are added after the export: torch.onnx runs onnxscript's version converter on every
model, which inlines every function a translation calls. A translation therefore emits a plain node of
the qlfx domain (its ``OpSchema`` given to onnxscript's ``Op``), and the FunctionProtos are appended to
the exported model.

Every op torch.onnx cannot convert is listed at once, with the module path and source line of the
qlfx node it came from, in one :class:`~qlfx.errors.UnsupportedOpsError`, and nothing is written: when
the export fails, the program torch.onnx translates (after its decompositions) is dispatched op by op
against the same registry (torchlib + the translations here).

Public API: :func:`export_onnx`, :func:`to_onnx_model` (the ``onnx.ModelProto`` without writing),
:func:`supported_targets`.
"""
import functools
import math
import operator
from pathlib import Path
from typing import Sequence, TypeVar, Union

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
import torch
import torch.fx as fx
from onnx.defs import OpSchema
from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16, INT64
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from .. import capture, emit
from ..errors import QlfxError, UnsupportedOpsError, UsageError
from ..io import atomic_write, ensure_writable_dir
from ..quantization import is_quantized

__all__ = ["export_onnx", "to_onnx_model", "check_in_onnxruntime", "supported_targets", "add_functions",
           "store_quantized_constants", "tile_channel_repeats",
           "TRANSLATIONS", "QLFX_DOMAIN", "OnnxCheckError"]

QLFX_DOMAIN = "qlfx"
# onnxruntime's int8 kernels against the graph's fake-quant simulation: the same integers except where a
# float sum lands within rounding of a .5 step of a quantiser, which then moves one step and carries on
QUANTIZED_TOLERANCE = 0.02
MIN_OPSET = 18  # torchlib's opset: reductions take axes as inputs
_QLFX = Opset(QLFX_DOMAIN, 1)


class OnnxCheckError(QlfxError):
    """The emitted model failed onnx.checker (a bug in the emitter: please report it with the model)."""


# ------------------------------------------------------------------------------ qlfx's ONNX functions
# Written without ``from __future__ import annotations``: onnxscript reads the annotations as types.
FloatT = TypeVar("FloatT", bound=Union[FLOAT, DOUBLE, FLOAT16, BFLOAT16])


@onnxscript.script(_QLFX, default_opset=op)
def BranchProduct(X: FloatT, Wa: FloatT, Ba: FloatT, Wb: FloatT, Bb: FloatT, strides: Sequence[int],
                  pads_b: Sequence[int], dilations_b: Sequence[int], group_b: int) -> FloatT:
    """Conv(X, Wa, Ba, strides) * Conv(X, Wb, Bb, strides, pads_b, dilations_b, group_b):
    qlfx::branch_product, Wa 1x1 groups 1."""
    a = op.Conv(X, Wa, Ba, strides=strides)
    b = op.Conv(X, Wb, Bb, strides=strides, pads=pads_b, dilations=dilations_b, group=group_b)
    return op.Mul(a, b)


@onnxscript.script(_QLFX, default_opset=op)
def BranchProductRepeat(X: FloatT, Wa: FloatT, Ba: FloatT, Wb: FloatT, Bb: FloatT, RepeatIndex: INT64,
                        strides: Sequence[int], pads_b: Sequence[int], dilations_b: Sequence[int],
                        group_b: int) -> FloatT:
    """Conv(X, Wa, Ba, strides) * Conv(Gather(X, RepeatIndex, axis=1), Wb, Bb, strides, pads_b, dilations_b,
    group_b): qlfx::branch_product with a depthwise b branch that has a channel multiplier."""
    a = op.Conv(X, Wa, Ba, strides=strides)
    repeated = op.Gather(X, RepeatIndex, axis=1)
    b = op.Conv(repeated, Wb, Bb, strides=strides, pads=pads_b, dilations=dilations_b, group=group_b)
    return op.Mul(a, b)


@onnxscript.script(_QLFX, default_opset=op)
def Hardball(X: FloatT, radius: float) -> FloatT:
    """X * r / max(|X|, r), |X| the L2 norm over axis 1."""
    r = op.CastLike(radius, X)
    norm = op.Sqrt(op.ReduceSumSquare(X, [1], keepdims=1))
    return op.Mul(X, op.Div(r, op.Max(norm, r)))


@onnxscript.script(_QLFX, default_opset=op)
def Softball(X: FloatT, radius: float) -> FloatT:
    """X / sqrt(1 + |X|^2 / r^2), |X| the L2 norm over axis 1."""
    r = op.CastLike(radius, X)
    squared_norm = op.ReduceSumSquare(X, [1], keepdims=1)
    return op.Div(X, op.Sqrt(op.Add(op.CastLike(1.0, X), op.Div(squared_norm, op.Mul(r, r)))))


FUNCTIONS = {f.name: f for f in (BranchProduct, BranchProductRepeat, Hardball, Softball)}


def _node_op(function) -> Op:
    """The qlfx-domain op a translation calls: one node, with the ``OpSchema`` torch.onnx's recorder
    needs, made from the function's signature (float tensors T, the int64 repeat index I)."""
    inputs, attributes = [], []
    for param in function.op_signature.params:
        if isinstance(param, ir.schemas.AttributeParameter):
            attributes.append(OpSchema.Attribute(param.name, OpSchema.AttrType[param.type.name], ""))
        else:
            inputs.append(OpSchema.FormalParameter(param.name, "T" if param.type_constraint.name == "FloatT" else "I"))
    constraints = [("T", ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"], "")]
    if any(p.type_str == "I" for p in inputs):
        constraints.append(("I", ["tensor(int64)"], ""))
    schema = OpSchema(function.name, QLFX_DOMAIN, 1, doc=function.function.__doc__ or "", inputs=inputs,
                      outputs=[OpSchema.FormalParameter("Y", "T")], type_constraints=constraints,
                      attributes=attributes)
    return Op(_QLFX, function.name, schema)


_BRANCH_PRODUCT, _BRANCH_PRODUCT_REPEAT, _HARDBALL, _SOFTBALL = (
    _node_op(f) for f in (BranchProduct, BranchProductRepeat, Hardball, Softball))


# ------------------------------------------------------------------------- translations (torch.onnx)
def _channels(x) -> int:
    channels = x.shape[1] if x.shape is not None and len(x.shape) > 1 else None
    if not isinstance(channels, int):
        raise ValueError("qlfx's ONNX translations need a static channel count (dim 1)")
    return channels


def _radius(x, radius) -> float:
    return float(radius) if radius is not None else math.sqrt(_channels(x))


def _hardball(x, radius=None):
    return _HARDBALL(x, radius=_radius(x, radius))


def _softball(x, radius=None):
    return _SOFTBALL(x, radius=_radius(x, radius))


def _zeros_like_rows(weight):
    return op.Constant(value=ir.tensor(np.zeros(weight.shape[0], weight.dtype.numpy())))


def _branch_product(x, weight_a, bias_a, weight_b, bias_b, stride, padding_b, dilation_b, groups_b):
    bias_a = bias_a if bias_a is not None else _zeros_like_rows(weight_a)
    bias_b = bias_b if bias_b is not None else _zeros_like_rows(weight_b)
    attrs = {"strides": list(stride), "pads_b": list(padding_b) * 2, "dilations_b": list(dilation_b),
             "group_b": int(groups_b)}
    channels, outputs = _channels(x), int(weight_b.shape[0])
    if int(groups_b) == channels > 1 and outputs > channels:  # depthwise with a channel multiplier
        index = op.Constant(value=ir.tensor(np.repeat(np.arange(channels, dtype=np.int64), outputs // channels)))
        return _BRANCH_PRODUCT_REPEAT(x, weight_a, bias_a, weight_b, bias_b, index, **{**attrs, "group_b": outputs})
    return _BRANCH_PRODUCT(x, weight_a, bias_a, weight_b, bias_b, **attrs)


TRANSLATIONS = {
    torch.ops.qlfx.branch_product.default: _branch_product,
    torch.ops.qlfx.hardball.default: _hardball,
    torch.ops.qlfx.softball.default: _softball,
}


# ---------------------------------------------------------------------------------------- coverage
@functools.lru_cache(maxsize=None)
def _registry():
    """torch.onnx's registry (torchlib) plus qlfx's translations: what ``torch.onnx.export`` dispatches on."""
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    for target, translation in TRANSLATIONS.items():
        registry.register_op(target, translation)
    return registry


def supported_targets() -> list[str]:
    """Names of the ATen / qlfx ops torch.onnx translates (after its decompositions, more ops export)."""
    return sorted(str(target) for target in _registry().functions)


def unsupported_sites(gm: fx.GraphModule, ep: torch.export.ExportedProgram) -> list[str]:
    """One line per qlfx node whose ops torch.onnx cannot translate: the program is decomposed as
    torch.onnx.export decomposes it and every op dispatched against the same registry."""
    from torch.onnx._internal.exporter import _core, _dispatching

    registry = _registry()
    prepared = _core._prepare_exported_program_for_export(ep, registry=registry)
    missing = [node for node in prepared.graph.nodes
               if node.op == "call_function" and node.target is not operator.getitem  # a reference, not an op
               and _dispatching.dispatch(node, registry)[0] is None]
    return emit.unsupported_sites(gm, missing, "no ONNX translation for")


# ------------------------------------------------------------------------------ quantised constants
def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """name -> value of every initializer and ``Constant`` node output of ``graph``."""
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.attribute:
            if node.attribute[0].name == "value":
                values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def _per_axis(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """A scale / zero point (scalar or 1-D along ``axis``) shaped to broadcast against a rank-``rank`` tensor."""
    if values.ndim == 0:
        return values
    shape = [1] * rank
    shape[axis % rank] = values.shape[0]
    return values.reshape(shape)


def store_quantized_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give a QDQ model (``aten.fake_quantize_*`` exports as QuantizeLinear -> DequantizeLinear) the form
    onnxruntime's int8 fusion matches; return it (changed in place). Two rewrites, both exact:

    - a ``QuantizeLinear`` of a constant (a quantised weight) becomes the int8 initializer it computes
      (``saturate(rint(w * (1 / scale)) + zero_point)``, half to even, in float32 as torch's fake
      quantisation computes it), so ``DequantizeLinear`` reads stored integers;
    - the float bias of a ``Conv`` / ``Gemm`` whose input and weight are both dequantised becomes int32
      ``q_b = rint(b / (s_x * s_w))`` with ``DequantizeLinear(q_b, s_x * s_w)`` (per output channel): the
      bias an int8 kernel adds to its int32 accumulator. Exact when ``b`` already lies on that grid
      (passes/quantize.py rounds it so).
    """
    graph = proto.graph
    constants = _constant_values(graph)
    producer = {out: node for node in graph.node for out in node.output}
    kept, folded = [], {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx") and len(node.input) == 3 \
                and all(i in constants for i in node.input):
            w, scale, zero = (constants[i] for i in node.input)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            info = np.iinfo(zero.dtype)
            # w * (1 / scale) in float32, as torch's fake_quantize computes it (w / scale rounds some ties the
            # other way: the stored integers would differ from the simulation the pass manager checked)
            inverse = np.float32(1) / _per_axis(scale.astype(np.float32), axis, w.ndim)
            q = np.rint(w.astype(np.float32) * inverse)
            q = np.clip(q + _per_axis(zero.astype(np.float32), axis, w.ndim), info.min, info.max).astype(zero.dtype)
            graph.initializer.append(onnx.numpy_helper.from_array(q, node.output[0]))
            folded[node.output[0]] = q
            continue
        kept.append(node)
    constants.update(folded)
    added = []
    for node in kept:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in constants:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if not all(d is not None and d.op_type == "DequantizeLinear" for d in (dq_x, dq_w)):
            continue
        if dq_w.input[0] not in constants or not all(i in constants for i in (*dq_x.input[1:2], *dq_w.input[1:2])):
            continue
        bias = constants[node.input[2]].astype(np.float32)
        scale = (constants[dq_x.input[1]].astype(np.float32) * constants[dq_w.input[1]].astype(np.float32))
        scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
        q = np.clip(np.rint(bias / scale), -2.0 ** 31, 2.0 ** 31 - 1).astype(np.int32)
        base = f"{node.input[2]}_int32_{len(added)}"
        graph.initializer.extend([onnx.numpy_helper.from_array(q, base),
                                  onnx.numpy_helper.from_array(scale, f"{base}_scale"),
                                  onnx.numpy_helper.from_array(np.zeros_like(q), f"{base}_zero_point")])
        dequantized = f"{base}_dequantized"
        added.append(onnx.helper.make_node("DequantizeLinear", [base, f"{base}_scale", f"{base}_zero_point"],
                                           [dequantized], axis=0, name=f"{base}_DequantizeLinear"))
        node.input[2] = dequantized
    if not folded and not added:
        return proto
    del graph.node[:]
    graph.node.extend(added + kept)  # the new nodes read initializers only
    read = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    unread = [t for t in graph.initializer if t.name not in read]  # the float weights and biases replaced
    for t in unread:
        graph.initializer.remove(t)
    return proto


def _int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def tile_channel_repeats(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Run the channel repeats of an int8 QDQ model on onnxruntime's NHWC int8 path; return the model
    (changed in place). Exact: the same numbers, with channels renumbered between two convs.

    expand-depthwise's channel repeat (every channel m times, ``repeat_interleave``) exports as
    Unsqueeze -> Expand -> Reshape, which onnxruntime's layout optimiser cannot move its NHWC transposes
    through: every repeat costs a Transpose to NCHW and one back (measured on qlnet50 at 224, 2 threads:
    32 uint8 Transposes, 8 % of the int8 model's time). Where the repeat feeds (through its
    QuantizeLinear -> DequantizeLinear) only depthwise convs over the repeated channels, whose outputs
    feed (likewise) only dense convs, it becomes ``Tile`` (every channel block repeated m times, which
    the optimiser runs in NHWC): repeated channel t = k C + c holds channel c, so the depthwise conv's
    output channels (weights, scales, bias) are permuted to o = c m + k and the dense convs' input
    channels (their weights' axis 1) by the same permutation.
    """
    graph = proto.graph
    constants = _constant_values(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    initializers = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}

    def only(name, op_type):
        nodes = readers.get(name, [])
        return nodes if nodes and name not in outputs and all(n.op_type == op_type and n.domain in ("", "ai.onnx")
                                                              for n in nodes) else None

    def uniform(value):  # the same under any permutation of its channels
        return value.size <= 1 or bool(np.all(value == value.reshape(-1)[0]))

    def dequantized_initializers(name):  # a DequantizeLinear of stored constants, each read only there or uniform
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or not all(i in initializers for i in dq.input) \
                or any(len(readers.get(i, [])) != 1 and not uniform(constants[i]) for i in dq.input):
            return None
        return dq

    shapes = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
            dims = v.type.tensor_type.shape.dim
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    except Exception:  # noqa: BLE001 -- no shapes, no rewrite
        return proto

    replaced, dropped = {}, set()
    for reshape in graph.node:
        if reshape.op_type != "Reshape" or len(reshape.input) != 2:
            continue
        expand = producer.get(reshape.input[0])
        unsqueeze = producer.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.input) != 2 \
                or any(len(readers.get(n.output[0], [])) != 1 for n in (unsqueeze, expand)) \
                or not all(i in constants for i in (unsqueeze.input[1], expand.input[1], reshape.input[1])):
            continue
        shape = constants[expand.input[1]].astype(np.int64).reshape(-1)
        before, after = shapes.get(unsqueeze.input[0]), shapes.get(reshape.output[0])
        if constants[unsqueeze.input[1]].reshape(-1).tolist() != [2] or shape.shape != (5,) \
                or shape[[0, 1, 3, 4]].tolist() != [1, 1, 1, 1] or shape[2] < 2 or not before or not after \
                or len(before) != 4 or None in before[1:] \
                or after[1:] != [before[1] * int(shape[2]), *before[2:]]:  # [N, C, H, W] -> [N, m C, H, W]
            continue
        mult = int(shape[2])
        quantize = only(reshape.output[0], "QuantizeLinear")
        dqs = only(quantize[0].output[0], "DequantizeLinear") if quantize and len(quantize) == 1 else None
        convs = [c for dq in dqs or [] for c in (only(dq.output[0], "Conv") or [None])]
        if not convs or None in convs:
            continue
        plan, ok = [], True
        for conv in convs:
            weight = dequantized_initializers(conv.input[1])
            bias = dequantized_initializers(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
            channels = int(constants[weight.input[0]].shape[0]) if weight is not None else 0
            if weight is None or (len(conv.input) > 2 and conv.input[2] and bias is None) \
                    or _int_attribute(conv, "group", 1) != channels or channels % mult \
                    or constants[weight.input[0]].shape[1] != 1:
                ok = False
                break
            q_out = only(conv.output[0], "QuantizeLinear")
            dq_out = only(q_out[0].output[0], "DequantizeLinear") if q_out and len(q_out) == 1 else None
            dense = [c for dq in dq_out or [] for c in (only(dq.output[0], "Conv") or [None])]
            dense_weights = [dequantized_initializers(c.input[1]) if c is not None and _int_attribute(c, "group", 1) == 1
                             else None for c in dense]
            if not dense or None in dense_weights:
                ok = False
                break
            plan.append((channels, [weight] + ([bias] if bias is not None else []), dense_weights))
        if not ok or len({channels for channels, _, _ in plan}) != 1:
            continue
        channels = plan[0][0]
        c_in = channels // mult
        perm = np.array([(t % c_in) * mult + t // c_in for t in range(channels)])  # tiled t <- interleaved o

        def permute(name, axis):
            value = constants[name]
            if value.ndim > axis and value.shape[axis] == channels and not uniform(value):
                value = np.take(value, perm, axis=axis)
                initializers[name].CopyFrom(onnx.numpy_helper.from_array(value, name))
                constants[name] = value

        for _, depthwise, dense_weights in plan:
            for dq in depthwise:
                for name in dq.input:
                    permute(name, 0)
            for dq in dense_weights:
                permute(dq.input[0], 1)
        repeats = f"{reshape.output[0]}_tile_repeats"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, mult, 1, 1], dtype=np.int64), repeats))
        replaced[id(reshape)] = onnx.helper.make_node("Tile", [unsqueeze.input[0], repeats], [reshape.output[0]],
                                                      name=f"{reshape.name or reshape.output[0]}_Tile")
        dropped |= {id(unsqueeze), id(expand)}
    if not replaced:
        return proto
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    read = {i for node in graph.node for i in node.input} | outputs
    for t in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(t)
    return proto


# ------------------------------------------------------------------------------------------- API
def _input_names(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def _output_names(ep: torch.export.ExportedProgram) -> list[str]:
    count = len(ep.graph_signature.user_outputs)
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def add_functions(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Append the FunctionProto of every qlfx op the graph calls (in the model's standard opset) to a
    model that ``torch.onnx.export(..., custom_translation_table=TRANSLATIONS)`` made; return it."""
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    have = {(f.domain, f.name) for f in proto.functions}
    for name in sorted({n.op_type for n in proto.graph.node if n.domain == QLFX_DOMAIN} - {n for _, n in have}):
        function = FUNCTIONS[name].to_function_proto()
        for imported in function.opset_import:
            if imported.domain == "":
                imported.version = opset
        proto.functions.append(function)
    return proto


def to_onnx_model(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], opset: int = MIN_OPSET,
                  check: bool = True) -> onnx.ModelProto:
    """Convert ``gm`` to an ``onnx.ModelProto`` (see module docstring); raise UnsupportedOpsError listing
    every node torch.onnx cannot convert, OnnxCheckError if onnx.checker (full_check) rejects the result."""
    if not isinstance(gm, fx.GraphModule):
        raise UsageError(f"export_onnx takes a torch.fx GraphModule (Compiled.graph_module), got {type(gm).__name__}")
    if opset < MIN_OPSET:
        raise UsageError(f"opset {opset} is too old: torch.onnx emits opset {MIN_OPSET} or newer")
    ep = capture.to_exported_program(gm, example_inputs)
    from torch.onnx._internal.exporter import _core

    try:
        # torch.onnx.export's own core, handed the registry built once per process (building it takes
        # ~1.7 s, which torch.onnx.export would pay on every call)
        program = _core.export(ep, registry=_registry(), opset_version=opset, input_names=_input_names(gm),
                               output_names=_output_names(ep), verbose=False, optimize=True)
    except Exception as err:  # noqa: BLE001 -- find out what it could not convert, all at once
        sites = unsupported_sites(gm, ep)
        if sites:
            raise UnsupportedOpsError(
                "ONNX export", sites,
                "Nothing was written. Express these parts of the model with ops torch.onnx supports "
                "(qlfx.emit.onnx.supported_targets() lists them), or run passes that remove them first.") from err
        raise QlfxError(f"torch.onnx.export failed on a graph whose ops it supports: {type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    program.model.producer_name = "qlfx"
    proto = ir.serde.serialize_model(program.model)
    add_functions(proto)
    store_quantized_constants(proto)
    if is_quantized(gm):
        tile_channel_repeats(proto)
    if check:
        try:
            onnx.checker.check_model(proto, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
            raise OnnxCheckError(f"the emitted ONNX model fails onnx.checker: {err}") from err
    return proto


def check_in_onnxruntime(data: bytes, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                         tolerance: float = 1e-4) -> float:
    """Run the serialized model in onnxruntime on the example inputs and compare every output with the
    graph's: ``max|ort - torch| <= tolerance * max|torch|`` (the pass manager's fp32 rule). Returns the
    worst relative error; raises OnnxCheckError when an output breaks the rule."""
    import onnxruntime as ort

    from ..verify import run_outputs

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feed = {i.name: t.detach().numpy() for i, t in zip(session.get_inputs(), example_inputs)}
    worst = 0.0
    for k, (got, ref) in enumerate(zip(session.run(None, feed), run_outputs(gm, example_inputs))):
        ref = ref.detach().double().numpy()
        scale = float(np.abs(ref).max()) or 1.0
        error = float(np.abs(got.astype(np.float64) - ref).max()) / scale
        if not error <= tolerance:
            raise OnnxCheckError(f"onnxruntime's output {k} differs from the graph's by {error:.3g} relative "
                                 f"(allowed {tolerance:g}) on the example input: an emitter bug, please report it")
        worst = max(worst, error)
    return worst


def export_onnx(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], path, opset: int = MIN_OPSET,
                check: bool = True) -> Path:
    """Write ``gm`` as an ONNX model at ``path`` (atomically: whole or not at all); return the path.

    With ``check`` (default) the model passes onnx.checker (full check, shape inference) and runs in
    onnxruntime on the example inputs with the graph's outputs (:func:`check_in_onnxruntime`; a graph
    the ``quantize`` pass made is an int8 QDQ model, checked within ``QUANTIZED_TOLERANCE``).
    Raises UsageError for an unwritable path (before any work), UnsupportedOpsError listing every
    node without an ONNX form, OnnxCheckError when a check fails.
    """
    path = Path(path)
    ensure_writable_dir(path.parent if str(path.parent) else ".")
    if path.is_dir():
        raise UsageError(f"'{path}' is a folder; give a file path such as '{path / 'model.onnx'}'")
    proto = to_onnx_model(gm, example_inputs, opset=opset, check=check)
    data = proto.SerializeToString()
    if check:
        check_in_onnxruntime(data, gm, capture.check_example_inputs(example_inputs),
                             tolerance=QUANTIZED_TOLERANCE if is_quantized(gm) else 1e-4)
    try:
        atomic_write(path, data)
    except OSError as err:
        raise UsageError(f"cannot write '{path}': {err}. Choose a writable path.") from err
    return path
