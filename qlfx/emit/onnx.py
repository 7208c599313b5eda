"""ONNX emitter: the canonical qlfx IR (a torch.fx GraphModule) -> an ONNX model, node by node.

A direct converter, not torch.onnx: every fx node goes through one small function of the table below
(``@converts(target)``), which builds ONNX nodes with an ``onnx_ir`` tape. Every node that has no
converter, or whose arguments a converter cannot express, is collected and all are reported at once
in one :class:`~qlfx.errors.UnsupportedOpsError`; nothing is written then.

Shapes are static: they come from ``node.meta["tensor_meta"]`` after propagating ``example_inputs``
(the ONNX graph's inputs have exactly the example inputs' shapes and dtypes).

qlfx's own ops become model-local ONNX functions of standard ops, so any ONNX runtime runs them and a
backend that knows them can match them by name:

- ``qlfx.BranchProduct(X, Wa, Ba, Wb, Bb)`` <strides, pads_b, dilations_b, group_b>; with a depthwise b
  branch that has a channel multiplier, ``qlfx.BranchProductRepeat(X, Wa, Ba, Wb, Bb, RepeatIndex)``
  (b reads the channel-repeated input through a pure depthwise conv: runtimes are fast only on those)
  = ``Mul(Conv(X, Wa, Ba, strides), Conv(X, Wb, Bb, strides, pads_b, dilations_b, group_b))``
  (``torch.ops.qlfx.branch_product``, see :mod:`qlfx.ops`; a missing bias is passed as zeros);
- ``qlfx.Hardball(X)`` <radius> = ``X * r / max(|X|, r)``, |X| the L2 norm over axis 1;
- ``qlfx.Softball(X)`` <radius> = ``X / sqrt(1 + |X|^2 / r^2)``; radius = the module's radius or sqrt(C).

Public API: :func:`export_onnx`, :func:`to_onnx_model` (the ``onnx.ModelProto`` without writing),
:func:`supported_targets`.
"""
from __future__ import annotations

import math
import operator
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import ir as qir
from ..errors import QlfxError, UnsupportedOpsError, UsageError
from ..io import atomic_write, ensure_writable_dir

__all__ = ["export_onnx", "to_onnx_model", "supported_targets", "QLFX_DOMAIN", "OnnxCheckError"]

QLFX_DOMAIN = "qlfx"
_INT64_MAX = np.iinfo(np.int64).max


class OnnxCheckError(QlfxError):
    """The emitted model failed onnx.checker (a bug in the emitter: please report it with the model)."""


class _Unsupported(Exception):
    """Raised by a converter for arguments it cannot express; the message says which."""


# ------------------------------------------------------------------------------------------ table
_CONVERTERS: dict[Any, Callable] = {}


def converts(*targets):
    """Register a converter ``fn(em, node, *args, **kwargs) -> value`` for call_function targets
    (callables) or call_method names (written ``"method:name"``). ``args`` are the fx node's arguments
    with nodes replaced by their ONNX values (or Python values for sizes)."""

    def register(fn):
        for t in targets:
            if t is not None:
                _CONVERTERS[t] = fn
        return fn

    return register


def supported_targets() -> list[str]:
    """Names of the fx targets the emitter converts (plus call_module Hardball/Softball)."""
    names = [t if isinstance(t, str) else f"{getattr(t, '__module__', '')}.{getattr(t, '__name__', t)}"
             for t in _CONVERTERS]
    return sorted(set(names)) + ["call_module Hardball", "call_module Softball"]


# ---------------------------------------------------------------------------------------- emitter
_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
                   torch.int64: np.int64, torch.int32: np.int32, torch.int8: np.int8, torch.uint8: np.uint8,
                   torch.bool: np.bool_}


def _np_dtype(dtype: torch.dtype):
    if dtype not in _TORCH_TO_NUMPY:
        raise _Unsupported(f"dtype {dtype} has no ONNX mapping here")
    return np.dtype(_TORCH_TO_NUMPY[dtype])


class _Emitter:
    def __init__(self, gm: fx.GraphModule, opset: int):
        self.gm = gm
        self.opset = opset
        self.tape = ir.tape.Tape()
        self.env: dict[fx.Node, Any] = {}
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self.unsupported: list[str] = []
        self.functions: dict[str, ir.Function] = {}
        self._initializers: dict[str, ir.Value] = {}
        self._const_count = 0

    # -- building blocks --------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence, attributes: dict | None = None, domain: str = "") -> ir.Value:
        attributes = {k: v for k, v in (attributes or {}).items() if v is not None}
        inputs = list(inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()  # omit trailing optional inputs (onnxruntime 1.32 crashes on a trailing "" for some ops)
        return self.tape.op(op_type, inputs, attributes, domain=domain)

    def initializer(self, array: np.ndarray, name: str) -> ir.Value:
        if name in self._initializers:
            return self._initializers[name]
        value = self.tape.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)
        self._initializers[name] = value
        return value

    def const(self, array, dtype=None, hint: str = "const") -> ir.Value:
        """A new initializer holding ``array`` (numpy dtype ``dtype`` if given)."""
        self._const_count += 1
        return self.initializer(np.asarray(array, dtype=dtype), f"{hint}_{self._const_count}")

    def ints(self, values: Sequence[int], hint: str = "ints") -> ir.Value:
        return self.const(np.asarray(list(values), dtype=np.int64), hint=hint)

    def scalar(self, value, like: fx.Node) -> ir.Value:
        """A 0-d constant of ``like``'s dtype (for scalar operands of elementwise ops)."""
        return self.const(np.asarray(value, dtype=_np_dtype(meta(like).dtype)), hint="scalar")

    def tensor(self, arg, like: fx.Node, what: str) -> ir.Value:
        if isinstance(arg, ir.Value):
            return arg
        if isinstance(arg, (int, float, bool)):
            return self.scalar(arg, like)
        raise _Unsupported(f"{what} is a {type(arg).__name__}")

    # -- the walk ---------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self.env[node] = self.convert(node)
            except _Unsupported as why:
                self.unsupported.append(f"{node.name}: {_describe_target(node)}: {why}")
                self.env[node] = self._stand_in(node)
            except Exception as err:  # a converter bug must not hide the other sites
                self.unsupported.append(f"{node.name}: {_describe_target(node)}: converter failed: "
                                        f"{type(err).__name__}: {err}")
                self.env[node] = self._stand_in(node)
            value = self.env[node]
            if isinstance(value, ir.Value) and node.op not in ("output", "get_attr", "placeholder"):
                if value.producer() is not None and value.name is None:
                    value.name = node.name
                tm = node.meta.get("tensor_meta")
                if value.shape is None and hasattr(tm, "shape") and tm.dtype in _TORCH_TO_NUMPY:
                    # Converters read their inputs' shapes from here (static shapes).
                    value.shape = ir.Shape(list(tm.shape))
                    value.type = ir.TensorType(ir.DataType.from_numpy(_np_dtype(tm.dtype)))

    def _stand_in(self, node: fx.Node) -> ir.Value:
        # Lets the walk go on past an unsupported node, so that every unsupported site is reported.
        return ir.Value(name=f"unsupported_{node.name}")

    def convert(self, node: fx.Node):
        if node.op == "placeholder":
            tm = meta(node)
            value = ir.Value(name=node.name, shape=ir.Shape(list(tm.shape)),
                             type=ir.TensorType(ir.DataType.from_numpy(_np_dtype(tm.dtype))))
            self.inputs.append(value)
            return value
        if node.op == "get_attr":
            t = qir.get_tensor(self.gm, node)
            if not isinstance(t, torch.Tensor):
                return t
            return self.initializer(t.detach().cpu().numpy().astype(_np_dtype(t.dtype)), node.target)
        if node.op == "output":
            self._set_outputs(fx.node.map_arg(node.args[0], lambda n: self.env[n]))
            return None
        if node.op == "call_module":
            return _convert_module(self, node)
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        if node.op == "call_function":
            fn = _CONVERTERS.get(node.target)
            if fn is None and _all_python(args, kwargs) and node.target in _PYTHON_FOLDABLE:
                return node.target(*args, **kwargs)  # arithmetic on sizes: static shapes
            if fn is None:
                raise _Unsupported("no ONNX converter for this function")
            return fn(self, node, *args, **kwargs)
        if node.op == "call_method":
            fn = _CONVERTERS.get(f"method:{node.target}")
            if fn is None:
                raise _Unsupported("no ONNX converter for this method")
            return fn(self, node, *args, **kwargs)
        raise _Unsupported(f"node kind {node.op}")

    def _set_outputs(self, out) -> None:
        flat = list(out) if isinstance(out, (tuple, list)) else [out]
        for i, v in enumerate(flat):
            if isinstance(v, (tuple, list)):
                raise _Unsupported("nested output structures; return a flat tuple of tensors")
            if not isinstance(v, ir.Value):
                raise _Unsupported(f"output {i} is a {type(v).__name__}, not a tensor")
            # ONNX graph outputs must be produced by a node and appear once.
            if v.producer() is None or v in self.outputs:
                source, v = v, self.op("Identity", [v])
                v.shape, v.type = source.shape, source.type
            self.outputs.append(v)
        for i, v in enumerate(self.outputs):
            v.name = "output" if len(self.outputs) == 1 else f"output_{i}"

    def function(self, name: str, build: Callable[["_Emitter"], ir.Function]) -> None:
        if name not in self.functions:
            self.functions[name] = build(self)


# ------------------------------------------------------------------------------------------ helpers
def meta(node: fx.Node):
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        raise _Unsupported(f"no shape known for {node.name} (not a single tensor)")
    return tm


def out_shape(node: fx.Node) -> list[int]:
    return list(meta(node).shape)


def _rank(value: ir.Value, node_hint: fx.Node | None = None) -> int:
    if value.shape is not None:
        return len(value.shape)
    raise _Unsupported("input rank unknown")


def _describe_target(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"call_module {node.target} ({type(node.graph.owning_module.get_submodule(node.target)).__name__})"
    t = node.target
    if isinstance(t, str):
        return f"{node.op} {t}"
    return f"{node.op} {getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))}".replace(" .", " ")


def _all_python(args, kwargs) -> bool:
    found = []
    fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, ir.Value) else None)
    return not found


_PYTHON_FOLDABLE = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
                    operator.getitem, operator.neg, operator.mod, getattr, len, int, float, math.sqrt}


def _pair(v, n: int = 2) -> list[int]:
    if isinstance(v, (list, tuple)):
        v = list(v)
        return v * n if len(v) == 1 else [int(i) for i in v]
    return [int(v)] * n


def _shape_of(em: _Emitter, value: ir.Value) -> list[int]:
    if value.shape is None or not all(isinstance(d, int) for d in value.shape):
        raise _Unsupported("static input shape unknown")
    return list(value.shape)


# ------------------------------------------------------------------------------- conv / linear / bn
@converts(torch.conv2d)
def _conv2d(em, node, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    kernel, dilation = _shape_of(em, weight)[2:], _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [0, 0, 0, 0]
        elif padding == "same":  # torch puts the odd extra pixel at the end
            totals = [dilation[i] * (kernel[i] - 1) for i in range(2)]
            pads = [totals[0] // 2, totals[1] // 2, totals[0] - totals[0] // 2, totals[1] - totals[1] // 2]
        else:
            raise _Unsupported(f"padding={padding!r}")
    else:
        pads = _pair(padding) * 2
    return em.op("Conv", [input, weight, bias], {"strides": _pair(stride), "pads": pads, "dilations": dilation,
                                                 "group": int(groups), "kernel_shape": kernel})


@converts(F.linear, torch._C._nn.linear)
def _linear(em, node, input, weight, bias=None):
    if _rank(input) == 2:
        return em.op("Gemm", [input, weight, bias], {"transB": 1})
    y = em.op("MatMul", [input, em.op("Transpose", [weight], {"perm": [1, 0]})])
    return em.op("Add", [y, bias]) if bias is not None else y


@converts(F.batch_norm)
def _batch_norm(em, node, input, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5):
    if training:
        raise _Unsupported("batchnorm in training mode (batch statistics); call model.eval()")
    if running_mean is None or running_var is None:
        raise _Unsupported("batchnorm without running statistics")
    channels = out_shape(node)[1]
    dtype = _np_dtype(meta(node).dtype)
    weight = weight if weight is not None else em.const(np.ones(channels, dtype), hint="bn_scale")
    bias = bias if bias is not None else em.const(np.zeros(channels, dtype), hint="bn_bias")
    return em.op("BatchNormalization", [input, weight, bias, running_mean, running_var], {"epsilon": float(eps)})


@converts(F.group_norm)
def _group_norm(em, node, input, num_groups, weight=None, bias=None, eps=1e-5):
    # Decomposed: ONNX GroupNormalization's scale is per group before opset 21 (torch's is per channel).
    shape = out_shape(node)
    n, c = shape[0], shape[1]
    grouped = em.op("Reshape", [input, em.ints([n, num_groups, -1])])
    axes = em.ints([2])
    mean = em.op("ReduceMean", [grouped, axes], {"keepdims": 1})
    centred = em.op("Sub", [grouped, mean])
    var = em.op("ReduceMean", [em.op("Mul", [centred, centred]), axes], {"keepdims": 1})
    std = em.op("Sqrt", [em.op("Add", [var, em.scalar(eps, node)])])
    y = em.op("Reshape", [em.op("Div", [centred, std]), em.ints(shape)])
    per_channel = em.ints([c] + [1] * (len(shape) - 2))
    if weight is not None:
        y = em.op("Mul", [y, em.op("Reshape", [weight, per_channel])])
    if bias is not None:
        y = em.op("Add", [y, em.op("Reshape", [bias, per_channel])])
    return y


@converts(F.layer_norm)
def _layer_norm(em, node, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    normalized_shape = _pair(normalized_shape, 1) if isinstance(normalized_shape, int) else list(normalized_shape)
    dtype = _np_dtype(meta(node).dtype)
    weight = weight if weight is not None else em.const(np.ones(normalized_shape, dtype), hint="ln_scale")
    return em.op("LayerNormalization", [input, weight, bias],
                 {"axis": -len(normalized_shape), "epsilon": float(eps)})


# ------------------------------------------------------------------------------------- activations
@converts(F.relu, torch.relu, "method:relu")
def _relu(em, node, input, inplace=False):
    return em.op("Relu", [input])


def _clip(em, node, input, low, high):
    return em.op("Clip", [input, em.scalar(low, node), em.scalar(high, node)])


@converts(F.hardtanh)
def _hardtanh(em, node, input, min_val=-1.0, max_val=1.0, inplace=False):
    return _clip(em, node, input, min_val, max_val)


@converts(F.relu6, getattr(torch._C._nn, "relu6", None))
def _relu6(em, node, input, inplace=False):
    return _clip(em, node, input, 0.0, 6.0)


@converts(torch.clamp, torch.clip, "method:clamp", "method:clip")
def _clamp(em, node, input, min=None, max=None):
    if isinstance(min, ir.Value) or isinstance(max, ir.Value):
        raise _Unsupported("tensor-valued clamp bounds")
    return em.op("Clip", [input, em.scalar(min, node) if min is not None else None,
                          em.scalar(max, node) if max is not None else None])


@converts(torch.sigmoid, F.sigmoid, "method:sigmoid")
def _sigmoid(em, node, input):
    return em.op("Sigmoid", [input])


@converts(torch.tanh, F.tanh, "method:tanh")
def _tanh(em, node, input):
    return em.op("Tanh", [input])


@converts(F.hardsigmoid)
def _hardsigmoid(em, node, input, inplace=False):
    return em.op("HardSigmoid", [input], {"alpha": 1.0 / 6.0, "beta": 0.5})  # relu6(x + 3) / 6


@converts(F.hardswish)
def _hardswish(em, node, input, inplace=False):
    return em.op("HardSwish", [input])


@converts(F.silu)
def _silu(em, node, input, inplace=False):
    return em.op("Mul", [input, em.op("Sigmoid", [input])])


@converts(F.gelu)
def _gelu(em, node, input, approximate="none"):
    half_x = em.op("Mul", [input, em.scalar(0.5, node)])
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = em.op("Mul", [em.op("Mul", [input, input]), input])
        inner = em.op("Add", [input, em.op("Mul", [cube, em.scalar(0.044715, node)])])
        t = em.op("Tanh", [em.op("Mul", [inner, em.scalar(math.sqrt(2.0 / math.pi), node)])])
    elif approximate == "none":  # 0.5 x (1 + erf(x / sqrt 2))
        t = em.op("Erf", [em.op("Mul", [input, em.scalar(1.0 / math.sqrt(2.0), node)])])
    else:
        raise _Unsupported(f"gelu approximate={approximate!r}")
    return em.op("Mul", [half_x, em.op("Add", [t, em.scalar(1.0, node)])])


@converts(F.leaky_relu)
def _leaky_relu(em, node, input, negative_slope=0.01, inplace=False):
    return em.op("LeakyRelu", [input], {"alpha": float(negative_slope)})


@converts(F.softmax, torch.softmax, "method:softmax")
def _softmax(em, node, input, dim=None, _stacklevel=3, dtype=None):
    if dim is None or dtype is not None:
        raise _Unsupported("softmax needs an explicit dim and no dtype")
    return em.op("Softmax", [input], {"axis": int(dim)})


@converts(F.dropout, "method:contiguous", "method:detach", "method:clone")
def _identity(em, node, input, p=0.5, training=False, inplace=False, **_):
    if training:
        raise _Unsupported("dropout in training mode")
    return em.op("Identity", [input])


# ------------------------------------------------------------------------------------------ pooling
def _check_ceil_mode(em, node, input, kernel, stride, padding, dilation=(1, 1)) -> None:
    """torch drops a last window that would start in the right padding; ONNX keeps it. Refuse when
    that makes the sizes differ."""
    in_hw = _shape_of(em, input)[2:]
    onnx_hw = [math.ceil((in_hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) / stride[i]) + 1
               for i in range(2)]
    if onnx_hw != out_shape(node)[2:]:
        raise _Unsupported(f"ceil_mode pooling whose last window starts in the padding (torch gives "
                           f"{out_shape(node)[2:]}, ONNX would give {onnx_hw})")


@converts(F.max_pool2d, torch.max_pool2d)
def _max_pool2d(em, node, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                return_indices=False):
    if return_indices:
        raise _Unsupported("max_pool2d with return_indices")
    kernel = _pair(kernel_size)
    stride = _pair(stride) if stride not in (None, [], ()) else kernel
    if ceil_mode:
        _check_ceil_mode(em, node, input, kernel, stride, _pair(padding), _pair(dilation))
    return em.op("MaxPool", [input], {"kernel_shape": kernel, "strides": stride, "pads": _pair(padding) * 2,
                                      "dilations": _pair(dilation), "ceil_mode": int(bool(ceil_mode))})


@converts(F.avg_pool2d, torch._C._nn.avg_pool2d)
def _avg_pool2d(em, node, input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    if divisor_override is not None:
        raise _Unsupported("avg_pool2d with divisor_override")
    kernel = _pair(kernel_size)
    stride = _pair(stride) if stride not in (None, [], ()) else kernel
    if ceil_mode:
        _check_ceil_mode(em, node, input, kernel, stride, _pair(padding))
    return em.op("AveragePool", [input], {"kernel_shape": kernel, "strides": stride, "pads": _pair(padding) * 2,
                                          "ceil_mode": int(bool(ceil_mode)),
                                          "count_include_pad": int(bool(count_include_pad))})


def _adaptive_pool(em, node, input, output_size, global_op, window_op):
    in_hw = _shape_of(em, input)[2:]
    out_hw = [in_hw[i] if s is None else int(s) for i, s in
              enumerate(output_size if isinstance(output_size, (list, tuple)) else [output_size] * 2)]
    if out_hw == [1, 1]:
        return em.op(global_op, [input])
    if any(i % o for i, o in zip(in_hw, out_hw)):
        raise _Unsupported(f"adaptive pool from {in_hw} to {out_hw}: sizes not divisible, windows overlap")
    window = [i // o for i, o in zip(in_hw, out_hw)]
    return em.op(window_op, [input], {"kernel_shape": window, "strides": window})


@converts(F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d)
def _adaptive_avg_pool2d(em, node, input, output_size):
    return _adaptive_pool(em, node, input, output_size, "GlobalAveragePool", "AveragePool")


@converts(F.adaptive_max_pool2d)
def _adaptive_max_pool2d(em, node, input, output_size, return_indices=False):
    if return_indices:
        raise _Unsupported("adaptive_max_pool2d with return_indices")
    return _adaptive_pool(em, node, input, output_size, "GlobalMaxPool", "MaxPool")


@converts(F.interpolate)
def _interpolate(em, node, input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                 recompute_scale_factor=None, antialias=False):
    if mode != "nearest" or antialias:
        raise _Unsupported(f"interpolate mode={mode!r} (only 'nearest' is converted)")
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    rank = len(out_shape(node))
    if scale_factor is not None and not recompute_scale_factor:
        # torch maps output pixel d to input floor(d / scale_factor): ONNX asymmetric + floor with scales.
        scales = [1.0, 1.0] + [float(s) for s in _pair_float(scale_factor, rank - 2)]
        return em.op("Resize", [input, None, em.const(np.asarray(scales, np.float32), hint="scales")], attrs)
    # With a size, torch uses scale = in / out: ONNX's sizes input computes the same.
    return em.op("Resize", [input, None, None, em.ints(out_shape(node), hint="sizes")], attrs)


def _pair_float(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


# ------------------------------------------------------------------------------------------- shapes
@converts(torch.flatten, "method:flatten", torch.reshape, "method:reshape", "method:view", torch.squeeze,
          "method:squeeze", torch.unsqueeze, "method:unsqueeze")
def _reshape(em, node, input, *_, **__):
    # Static shapes: every view-like op is a Reshape to the traced output shape.
    return em.op("Reshape", [em.tensor(input, node, "input"), em.ints(out_shape(node), hint="shape")])


@converts("method:repeat")
def _repeat(em, node, input, *repeats):
    repeats = list(repeats[0]) if len(repeats) == 1 and isinstance(repeats[0], (list, tuple)) else list(repeats)
    shape = _shape_of(em, input)
    if len(repeats) > len(shape):  # torch prepends size-1 dims first
        shape = [1] * (len(repeats) - len(shape)) + shape
        input = em.op("Reshape", [input, em.ints(shape, hint="shape")])
    return em.op("Tile", [input, em.ints([int(r) for r in repeats], hint="repeats")])


@converts(torch.repeat_interleave, "method:repeat_interleave")
def _repeat_interleave(em, node, input, repeats, dim=None, *, output_size=None):
    """Each index repeated ``repeats`` times along ``dim``: a Gather with constant indices."""
    if not isinstance(repeats, int) or dim is None:
        raise _Unsupported("repeat_interleave with tensor repeats or without dim")
    shape = _shape_of(em, input)
    dim = dim + len(shape) if dim < 0 else dim
    indices = np.repeat(np.arange(shape[dim], dtype=np.int64), repeats)
    return em.op("Gather", [input, em.const(indices, hint="repeat_index")], {"axis": dim})


@converts(torch.cat, torch.concat)
def _cat(em, node, tensors, dim=0):
    return em.op("Concat", [em.tensor(t, node, "a concatenated value") for t in tensors], {"axis": int(dim)})


@converts(torch.permute, "method:permute")
def _permute(em, node, input, *dims):
    dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
    return em.op("Transpose", [input], {"perm": [int(d) for d in dims]})


@converts(torch.transpose, "method:transpose")
def _transpose(em, node, input, dim0, dim1):
    perm = list(range(_rank(input)))
    perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
    return em.op("Transpose", [input], {"perm": perm})


@converts(operator.getitem)
def _getitem(em, node, value, index):
    if not isinstance(value, ir.Value):
        return value[index]  # a tuple of values (split/chunk) or a size tuple
    index = index if isinstance(index, tuple) else (index,)
    shape = _shape_of(em, value)
    if sum(i is Ellipsis for i in index) > 1:
        raise _Unsupported("more than one Ellipsis")
    if Ellipsis in index:
        k = index.index(Ellipsis)
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        index = index[:k] + (slice(None),) * (len(shape) - consumed) + index[k + 1:]
    starts, ends, axes, steps = [], [], [], []
    dim = 0
    for item in index:
        if item is None:
            continue  # a new axis: the final Reshape puts it in
        if isinstance(item, bool) or not isinstance(item, (int, slice)):
            raise _Unsupported(f"indexing with {type(item).__name__} (only ints, slices, None, ...)")
        if isinstance(item, int):
            i = item + shape[dim] if item < 0 else item
            starts.append(i), ends.append(i + 1), axes.append(dim), steps.append(1)
        elif item != slice(None):
            step = 1 if item.step is None else int(item.step)
            if step <= 0:
                raise _Unsupported("slices with a non-positive step")
            starts.append(0 if item.start is None else int(item.start))
            ends.append(_INT64_MAX if item.stop is None else int(item.stop))
            axes.append(dim), steps.append(step)
        dim += 1
    y = value
    if axes:
        y = em.op("Slice", [value, em.ints(starts, "starts"), em.ints(ends, "ends"), em.ints(axes, "axes"),
                            em.ints(steps, "steps")])
    if out_shape(node) != _slice_shape(shape, starts, ends, axes, steps):
        y = em.op("Reshape", [y, em.ints(out_shape(node), hint="shape")])  # ints dropped, None added
    elif y is value:
        y = em.op("Identity", [value])
    return y


@converts(torch.chunk, "method:chunk", torch.split, "method:split")
def _split(em, node, input, sections, dim=0):
    """chunk / split along one dim -> a tuple of Slices (getitem picks them)."""
    shape = _shape_of(em, input)
    dim = dim + len(shape) if dim < 0 else dim
    n = shape[dim]
    if node.target in (torch.chunk, "chunk"):
        step = -(-n // int(sections))
        sizes = [min(step, n - i) for i in range(0, n, step)]
    elif isinstance(sections, int):
        sizes = [min(sections, n - i) for i in range(0, n, sections)]
    else:
        sizes = [int(v) for v in sections]
    pieces, start = [], 0
    for size in sizes:
        pieces.append(em.op("Slice", [input, em.ints([start], "starts"), em.ints([start + size], "ends"),
                                      em.ints([dim], "axes")]))
        start += size
    return tuple(pieces)


def _slice_shape(shape, starts, ends, axes, steps) -> list[int]:
    shape = list(shape)
    for s, e, a, st in zip(starts, ends, axes, steps):
        shape[a] = len(range(shape[a])[slice(s, e if e != _INT64_MAX else None, st)])
    return shape


@converts(getattr)
def _getattr(em, node, value, name):
    if name == "shape" and isinstance(value, ir.Value):
        return tuple(_shape_of(em, value))
    raise _Unsupported(f"getattr {name!r}")


@converts("method:size")
def _size(em, node, value, dim=None):
    shape = tuple(_shape_of(em, value))
    return shape if dim is None else shape[dim]


@converts("method:dim")
def _dim(em, node, value):
    return _rank(value)


# ----------------------------------------------------------------------------------- elementwise
def _binary(onnx_op: str, python_op):
    def convert(em, node, input, other, *, alpha=1, rounding_mode=None, out=None):
        if not isinstance(input, ir.Value) and not isinstance(other, ir.Value):
            return python_op(input, other)  # size arithmetic
        if rounding_mode is not None:
            raise _Unsupported(f"division with rounding_mode={rounding_mode!r}")
        a, b = em.tensor(input, node, "operand"), em.tensor(other, node, "operand")
        if alpha != 1:
            b = em.op("Mul", [b, em.scalar(alpha, node)])
        return em.op(onnx_op, [a, b])

    convert.__name__ = f"_{onnx_op.lower()}"
    return convert


converts(operator.add, operator.iadd, torch.add, "method:add")(_binary("Add", operator.add))
converts(operator.sub, operator.isub, torch.sub, "method:sub")(_binary("Sub", operator.sub))
converts(operator.mul, operator.imul, torch.mul, "method:mul")(_binary("Mul", operator.mul))
converts(operator.truediv, torch.div, torch.true_divide, "method:div")(_binary("Div", operator.truediv))


@converts(operator.neg, torch.neg, "method:neg")
def _neg(em, node, input):
    return em.op("Neg", [input]) if isinstance(input, ir.Value) else -input


def _unary(onnx_op: str):
    def convert(em, node, input):
        return em.op(onnx_op, [input])

    convert.__name__ = f"_{onnx_op.lower()}"
    return convert


converts(torch.abs, operator.abs, "method:abs")(_unary("Abs"))
converts(torch.exp, "method:exp")(_unary("Exp"))
converts(torch.sqrt, "method:sqrt")(_unary("Sqrt"))
converts(torch.erf, "method:erf")(_unary("Erf"))


@converts(torch.matmul, operator.matmul)
def _matmul(em, node, input, other):
    return em.op("MatMul", [input, other])


def _reduce(onnx_op: str):
    def convert(em, node, input, dim=None, keepdim=False, *, dtype=None):
        if dtype is not None:
            raise _Unsupported("reduction with dtype=")
        rank = _rank(input)
        dims = list(range(rank)) if dim is None else _pair(dim, 1) if isinstance(dim, int) else list(dim)
        return em.op(onnx_op, [input, em.ints([d % rank for d in dims], "axes")], {"keepdims": int(bool(keepdim))})

    convert.__name__ = f"_{onnx_op.lower()}"
    return convert


converts(torch.mean, "method:mean")(_reduce("ReduceMean"))
converts(torch.sum, "method:sum")(_reduce("ReduceSum"))


# -------------------------------------------------------------------------------- qlfx's own ops
def _function_graph(name: str, inputs: list[str], build) -> tuple[list[ir.Value], list[ir.Node], ir.Value]:
    values = [ir.Value(name=n) for n in inputs]
    tape = ir.tape.Tape()
    out = build(tape, *values)
    out.name = "Y"
    return values, list(tape.nodes), out


def _make_function(name: str, inputs: list[str], attributes: list[ir.Attr], opset: int, build) -> ir.Function:
    values, nodes, out = _function_graph(name, inputs, build)
    graph = ir.Graph(values, [out], nodes=nodes, opset_imports={"": opset}, name=name)
    fn = ir.Function(QLFX_DOMAIN, name, graph=graph, attributes=attributes)
    return fn


def _ref(name: str, attr_type: ir.AttributeType, as_name: str | None = None) -> ir.Attr:
    return ir.RefAttr(as_name or name, name, attr_type)


def _branch_product_function(em: _Emitter, repeat: bool = False) -> ir.Function:
    """``BranchProduct``: Conv(X, Wa, Ba) * Conv(X, Wb, Bb). With ``repeat`` (``BranchProductRepeat``, for a
    depthwise b branch with a channel multiplier) b reads Gather(X, RepeatIndex, axis=1) through a pure
    depthwise conv instead: the same sums (see passes/expand_depthwise.py), and runtimes are fast only on
    pure depthwise convs."""
    INTS, INT = ir.AttributeType.INTS, ir.AttributeType.INT

    def build(tape, x, wa, ba, wb, bb, *repeat_index):
        a = tape.op("Conv", [x, wa, ba], {"strides": [1, 1]})
        a.producer().attributes["strides"] = _ref("strides", INTS)
        xb = tape.op("Gather", [x, repeat_index[0]], {"axis": 1}) if repeat else x
        b = tape.op("Conv", [xb, wb, bb])
        for attr in (_ref("strides", INTS), _ref("pads_b", INTS, "pads"), _ref("dilations_b", INTS, "dilations"),
                     _ref("group_b", INT, "group")):
            b.producer().attributes[attr.name] = attr
        return tape.op("Mul", [a, b])

    attrs = [ir.Attr(n, t, None) for n, t in (("strides", INTS), ("pads_b", INTS), ("dilations_b", INTS),
                                             ("group_b", INT))]
    name = "BranchProductRepeat" if repeat else "BranchProduct"
    inputs = ["X", "Wa", "Ba", "Wb", "Bb"] + (["RepeatIndex"] if repeat else [])
    fn = _make_function(name, inputs, attrs, em.opset, build)
    fn.doc_string = ("Conv(X, Wa, Ba, strides) * Conv(" + ("Gather(X, RepeatIndex, axis=1)" if repeat else "X")
                     + ", Wb, Bb, strides, pads_b, dilations_b, group_b): qlfx::branch_product, Wa 1x1 groups 1")
    return fn


def _radial_function(em: _Emitter, name: str) -> ir.Function:
    FLOAT = ir.AttributeType.FLOAT

    def build(tape, x):
        squared_norm = tape.op("ReduceSumSquare", [x, tape.op("Constant", [], {"value_ints": [1]})], {"keepdims": 1})
        radius_const = tape.op("Constant", [])
        radius_const.producer().attributes["value_float"] = _ref("radius", FLOAT, "value_float")
        r = tape.op("CastLike", [radius_const, x])
        if name == "Hardball":  # x * r / max(|x|, r)
            scale = tape.op("Div", [r, tape.op("Max", [tape.op("Sqrt", [squared_norm]), r])])
            return tape.op("Mul", [x, scale])
        one = tape.op("CastLike", [tape.op("Constant", [], {"value_float": 1.0}), x])  # x / sqrt(1 + |x|^2/r^2)
        denominator = tape.op("Sqrt", [tape.op("Add", [one, tape.op("Div", [squared_norm, tape.op("Mul", [r, r])])])])
        return tape.op("Div", [x, denominator])

    fn = _make_function(name, ["X"], [ir.Attr("radius", FLOAT, None)], em.opset, build)
    fn.doc_string = {"Hardball": "X * r / max(|X|, r), |X| the L2 norm over axis 1",
                     "Softball": "X / sqrt(1 + |X|^2 / r^2), |X| the L2 norm over axis 1"}[name]
    return fn


def _zeros_bias(em: _Emitter, weight: ir.Value, hint: str) -> ir.Value:
    return em.const(np.zeros(_shape_of(em, weight)[0], weight.dtype.numpy()), hint=hint)


def _branch_product(em, node, x, weight_a, bias_a, weight_b, bias_b, stride, padding_b, dilation_b, groups_b):
    bias_a = bias_a if bias_a is not None else _zeros_bias(em, weight_a, "branch_bias_a")
    bias_b = bias_b if bias_b is not None else _zeros_bias(em, weight_b, "branch_bias_b")
    attrs = {"strides": _pair(stride), "pads_b": _pair(padding_b) * 2, "dilations_b": _pair(dilation_b),
             "group_b": int(groups_b)}
    channels, outputs_b = _shape_of(em, x)[1], _shape_of(em, weight_b)[0]
    if int(groups_b) == channels > 1 and outputs_b > channels:  # depthwise with a channel multiplier
        em.function("BranchProductRepeat", lambda e: _branch_product_function(e, repeat=True))
        index = em.const(np.repeat(np.arange(channels, dtype=np.int64), outputs_b // channels), hint="repeat_index")
        attrs["group_b"] = outputs_b
        return em.op("BranchProductRepeat", [x, weight_a, bias_a, weight_b, bias_b, index], attrs, domain=QLFX_DOMAIN)
    em.function("BranchProduct", _branch_product_function)
    return em.op("BranchProduct", [x, weight_a, bias_a, weight_b, bias_b], attrs, domain=QLFX_DOMAIN)


try:
    import qlfx.ops  # noqa: F401  (registers the op)

    converts(torch.ops.qlfx.branch_product.default, torch.ops.qlfx.branch_product)(_branch_product)
except (ImportError, AttributeError):  # pragma: no cover - ops.py missing
    pass


def _convert_module(em: _Emitter, node: fx.Node):
    from ..models.activations import Hardball, Softball

    module = em.gm.get_submodule(node.target)
    for cls, name in ((Hardball, "Hardball"), (Softball, "Softball")):
        if type(module) is cls:
            if len(node.args) != 1 or node.kwargs:
                raise _Unsupported(f"{name} called with extra arguments")
            x = em.env[node.args[0]]
            channels = out_shape(node.args[0])[1]
            radius = module.radius if module.radius is not None else math.sqrt(channels)
            em.function(name, lambda e, n=name: _radial_function(e, n))
            return em.op(name, [x], {"radius": float(radius)}, domain=QLFX_DOMAIN)
    raise _Unsupported("an opaque module; only Hardball/Softball modules are converted (inline the others, "
                       "or make them traceable so they become functional ops)")


# ------------------------------------------------------------------------------------------- API
def to_onnx_model(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], opset: int = 18,
                  check: bool = True) -> onnx.ModelProto:
    """Convert ``gm`` to an ``onnx.ModelProto`` (see module docstring); raise UnsupportedOpsError listing
    every node that cannot be converted, OnnxCheckError if onnx.checker (full_check) rejects the result."""
    if not isinstance(gm, fx.GraphModule):
        raise UsageError(f"export_onnx takes a torch.fx GraphModule (Compiled.graph_module), got {type(gm).__name__}")
    if opset < 18:
        raise UsageError(f"opset {opset} is too old: qlfx emits reductions with axes as inputs (opset >= 18)")
    example_inputs = qir.check_example_inputs(example_inputs)
    qir.propagate_shapes(gm, example_inputs)
    em = _Emitter(gm, opset)
    em.run()
    if em.unsupported:
        raise UnsupportedOpsError(
            "ONNX export", em.unsupported,
            "Nothing was written. Express these parts of the model with supported ops "
            "(qlfx.emit.onnx.supported_targets() lists them), or run passes that remove them first.",
        )
    graph = ir.Graph(em.inputs, em.outputs, nodes=em.tape.nodes, initializers=em.tape.initializers,
                     opset_imports={"": opset, QLFX_DOMAIN: 1}, name=gm.__class__.__name__ or "qlfx")
    model = ir.Model(graph, ir_version=10 if opset <= 21 else 11, producer_name="qlfx",
                     functions=list(em.functions.values()))
    from onnx_ir.passes.common import NameFixPass

    NameFixPass()(model)
    proto = ir.serde.serialize_model(model)
    if check:
        try:
            onnx.checker.check_model(proto, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
            raise OnnxCheckError(f"the emitted ONNX model fails onnx.checker: {err}") from err
    return proto


def export_onnx(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], path, opset: int = 18,
                check: bool = True) -> Path:
    """Write ``gm`` as an ONNX model at ``path`` (atomically: whole or not at all); return the path.

    Raises UsageError for an unwritable path (before any work), UnsupportedOpsError listing every
    node without an ONNX form, OnnxCheckError when check=True and onnx.checker rejects the model.
    """
    path = Path(path)
    ensure_writable_dir(path.parent if str(path.parent) else ".")
    if path.is_dir():
        raise UsageError(f"'{path}' is a folder; give a file path such as '{path / 'model.onnx'}'")
    proto = to_onnx_model(gm, example_inputs, opset=opset, check=check)
    try:
        atomic_write(path, proto.SerializeToString())
    except OSError as err:
        raise UsageError(f"cannot write '{path}': {err}. Choose a writable path.") from err
    return path
