"""Emit a canonical qlfx graph as a compiled TVM Relax module.

    build_tvm(gm, example_inputs, target) -> TVMModule

1. fx -> Relax: a direct converter over the canonical op set (qlfx.ir) with ``relax.BlockBuilder``;
   weights become Relax constants (baked into the module). Every op it cannot convert is listed at
   once in an ``UnsupportedOpsError``.
2. The fused branch product ``torch.ops.qlfx.branch_product`` (conv1x1(x) * conv_b(x), see
   qlfx/ops.py) becomes ``call_tir`` of the hand-written kernel of :mod:`qlfx.kernels`, tuned with
   MetaSchedule against a persistent JSON database (a second build of the same shapes tunes nothing).
   Without the kernel package it is lowered to two Relax conv2d + multiply (stated in ``.notes``).
3. The rest goes through Relax's default pipeline for the target (legalize, fuse, and for cuda the
   dlight default GPU schedules). Optionally (``tune_other_ops``) the remaining TIR tasks are tuned
   with MetaSchedule against the same database, skipping tasks the database already has.
4. ``TVMModule`` runs on numpy / torch inputs; ``.export(path)`` writes ``path.so`` + ``path.json``
   that :func:`qlfx.emit.tvm_runtime.load` runs without torch.
"""
from __future__ import annotations

import json
import operator
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import ir
from ..errors import UnsupportedOpsError, UsageError
from ..io import atomic_output, atomic_write
from . import tvm_runtime

BRANCH_PRODUCT_NAME = "qlfx.branch_product.default"


# ------------------------------------------------------------------------------------------- targets
def make_target(target: Any):
    """"llvm" | "cuda" | dict | tvm.target.Target -> tvm.target.Target with what MetaSchedule needs
    (llvm: num-cores; cuda: an llvm host)."""
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        spec: dict = {"kind": target.split()[0]}
        if " " in target.strip():  # "llvm -mcpu=..." style strings: let tvm parse them
            return tvm.target.Target(target)
    elif isinstance(target, dict):
        spec = dict(target)
    else:
        raise UsageError(f"target must be 'llvm', 'cuda', a dict or a tvm.target.Target; got {target!r}")
    kind = spec.get("kind")
    if kind == "llvm":
        spec.setdefault("num-cores", _physical_cores())
        # the host CPU by name, so LLVM uses its vector width (AVX-512 where present); without it the
        # code is generic x86-64 (SSE2) and every kernel runs several times slower
        spec.setdefault("mcpu", tvm.target.codegen.llvm_get_system_cpu())
        return tvm.target.Target(spec)
    if kind == "cuda":
        spec.setdefault("arch", "sm_90a")
        # Hopper limits; stated so tvm does not guess (48 KiB is the static shared-memory limit per block)
        spec.setdefault("max_shared_memory_per_block", 49152)
        spec.setdefault("max_threads_per_block", 1024)
        host = spec.pop("host", {"kind": "llvm"})
        return tvm.target.Target(spec, host=tvm.target.Target(host))
    raise UsageError(f"qlfx builds TVM modules for llvm (CPU) and cuda targets; got kind {kind!r}")


def _physical_cores() -> int:
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------- fx -> Relax
@dataclass
class _FusedSite:
    """A branch_product node, lowered to a kernel (filled in after conversion)."""

    node_name: str
    args: dict  # shapes and attributes
    gvar: Any = None


class _Converter:
    """fx GraphModule (canonical qlfx IR) -> Relax IRModule with one function ``main``."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], kernel_lowering: Callable):
        from tvm import relax

        self.gm = gm
        self.example_inputs = example_inputs
        self.relax = relax
        self.R = relax.op
        self.bb = relax.BlockBuilder()
        self.env: dict[fx.Node, Any] = {}
        self.kernel_lowering = kernel_lowering
        self.fused_sites: list[dict] = []
        self.handlers: dict[Any, Callable] = {
            torch.conv2d: self.conv2d,
            F.linear: self.linear,
            F.batch_norm: self.batch_norm,
            F.relu: lambda n, x, *a, **k: self.R.nn.relu(x),
            torch.relu: lambda n, x, *a, **k: self.R.nn.relu(x),
            F.hardtanh: self.hardtanh,
            torch.sigmoid: lambda n, x, *a, **k: self.R.sigmoid(x),
            torch.tanh: lambda n, x, *a, **k: self.R.tanh(x),
            F.silu: lambda n, x, *a, **k: self.R.nn.silu(x),
            F.hardswish: self.hardswish,
            F.hardsigmoid: self.hardsigmoid,
            F.gelu: self.gelu,
            F.leaky_relu: lambda n, x, slope=0.01, inplace=False: self.R.nn.leakyrelu(x, slope),
            F.max_pool2d: self.max_pool2d,
            F.avg_pool2d: self.avg_pool2d,
            F.adaptive_avg_pool2d: self.adaptive_avg_pool2d,
            torch.flatten: self.reshape_to_output,
            operator.add: self.binary(lambda a, b: self.R.add(a, b)),
            torch.add: self.binary(lambda a, b: self.R.add(a, b)),
            operator.sub: self.binary(lambda a, b: self.R.subtract(a, b)),
            torch.sub: self.binary(lambda a, b: self.R.subtract(a, b)),
            operator.mul: self.binary(lambda a, b: self.R.multiply(a, b)),
            torch.mul: self.binary(lambda a, b: self.R.multiply(a, b)),
            operator.truediv: self.binary(lambda a, b: self.R.divide(a, b)),
            torch.div: self.binary(lambda a, b: self.R.divide(a, b)),
            operator.getitem: self.getitem,
            torch.cat: self.cat,
            torch.reshape: self.reshape_to_output,
            F.group_norm: self.group_norm,
            F.layer_norm: self.layer_norm,
            torch.permute: self.permute,
            torch.mean: self.mean,
            F.relu6: lambda n, x, inplace=False: self.R.clip(x, 0.0, 6.0),
            F.dropout: lambda n, x, *a, **k: x,
            torch.repeat_interleave: self.repeat_interleave,
        }
        self.methods: dict[str, Callable] = {
            "add": self.binary(lambda a, b: self.R.add(a, b)),
            "mul": self.binary(lambda a, b: self.R.multiply(a, b)),
            "sub": self.binary(lambda a, b: self.R.subtract(a, b)),
            "div": self.binary(lambda a, b: self.R.divide(a, b)),
            "relu": lambda n, x, *a, **k: self.R.nn.relu(x),
            "sigmoid": lambda n, x, *a, **k: self.R.sigmoid(x),
            "view": self.reshape_to_output,
            "reshape": self.reshape_to_output,
            "flatten": self.reshape_to_output,
            "contiguous": lambda n, x, *a, **k: x,
            "repeat": self.repeat,
            "permute": self.permute,
            "mean": self.mean,
            "sum": self.reduce_sum,
        }

    # ---- helpers
    def dtype_of(self, node: fx.Node) -> str:
        tm = node.meta.get("tensor_meta")
        return str(tm.dtype).replace("torch.", "") if tm is not None else "float32"

    def out_shape(self, node: fx.Node) -> tuple[int, ...]:
        s = ir.shape(node)
        if s is None:
            raise UsageError(f"node '{node.name}' has no shape metadata; run ir.propagate_shapes(gm, inputs) first")
        return s

    def const(self, value, dtype: str = "float32"):
        return self.relax.const(np.asarray(value, dtype=dtype), dtype)

    def value(self, arg, dtype: str = "float32"):
        if isinstance(arg, fx.Node):
            return self.env[arg]
        if isinstance(arg, (int, float, bool)):
            return self.const(arg, dtype)
        raise TypeError(f"unsupported argument {arg!r}")

    def constant_tensor(self, node: fx.Node | None) -> np.ndarray | None:
        """The numpy value of a get_attr node (None for None / non-constants)."""
        if node is None or not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        return ir.get_tensor(self.gm, node).detach().cpu().numpy()

    # ---- op handlers (each returns a Relax expression)
    def conv2d(self, node, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        view = ir.ConvCall.of(node)
        weight_shape = ir.shape(view.weight)
        pad = view.padding
        if pad == "valid":
            pad = (0, 0)
        elif pad == "same":
            # torch 'same' pads (k-1)*d total, the extra one at the end
            total = [(k - 1) * d for k, d in zip(weight_shape[2:], view.dilation)]
            pad = (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)
        y = self.R.nn.conv2d(self.env[view.input], self.env[view.weight], strides=view.stride, padding=pad,
                             dilation=view.dilation, groups=view.groups)
        if view.bias is not None:
            y = self.R.add(self.bb.emit(y), self.R.reshape(self.env[view.bias], (1, -1, 1, 1)))
        return y

    def repeat_interleave(self, node, x, repeats, dim=None, output_size=None):
        if not isinstance(repeats, int) or dim is None:
            raise _Unsupported("repeat_interleave with tensor repeats or without dim")
        return self.R.repeat(x, repeats, axis=dim)

    def linear(self, node, x, w, b=None):
        wt = self.constant_tensor(node.args[1])
        weight_t = self.const(wt.T.copy(), str(wt.dtype)) if wt is not None else self.R.permute_dims(self.env[node.args[1]])
        y = self.R.matmul(self.env[node.args[0]], weight_t)
        if b is not None:
            y = self.R.add(self.bb.emit(y), self.env[node.args[2]])
        return y

    def batch_norm(self, node, x, running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5):
        if training:
            raise _Unsupported("batch_norm in training mode (call model.eval() before compiling)")
        args = dict(zip(("x", "rm", "rv", "w", "b"), node.args[:5]))
        args.update({k: node.kwargs[k] for k in ("weight", "bias") if k in node.kwargs})
        eps = node.kwargs.get("eps", eps)
        rm, rv = self.constant_tensor(args["rm"]), self.constant_tensor(args["rv"])
        w, b = self.constant_tensor(args.get("w")), self.constant_tensor(args.get("b"))
        if rm is None or rv is None or (args.get("w") is not None and w is None) or (args.get("b") is not None and b is None):
            raise _Unsupported("batch_norm with non-constant statistics")
        # y = (x - mean) / sqrt(var + eps) * w + b = x * scale + shift
        scale = (w if w is not None else 1.0) / np.sqrt(rv.astype(np.float64) + eps)
        shift = (b if b is not None else 0.0) - rm * scale
        dtype = self.dtype_of(node)
        rank = len(self.out_shape(node))
        bshape = (1, -1) + (1,) * (rank - 2)
        scaled = self.bb.emit(self.R.multiply(self.env[node.args[0]], self.const(scale.reshape(bshape), dtype)))
        return self.R.add(scaled, self.const(shift.reshape(bshape), dtype))

    def group_norm(self, node, x, num_groups, weight=None, bias=None, eps=1e-5):
        c = self.out_shape(node)[1]
        rank = len(self.out_shape(node))
        dtype = self.dtype_of(node)
        gamma = weight if weight is not None else self.const(np.ones(c), dtype)
        beta = bias if bias is not None else self.const(np.zeros(c), dtype)
        return self.R.nn.group_norm(x, gamma, beta, int(num_groups), 1, list(range(2, rank)), float(eps))

    def layer_norm(self, node, x, normalized_shape, weight=None, bias=None, eps=1e-5):
        rank = len(self.out_shape(node))
        k = len(normalized_shape)
        dtype = self.dtype_of(node)
        gamma = weight if weight is not None else self.const(np.ones(tuple(normalized_shape)), dtype)
        beta = bias if bias is not None else self.const(np.zeros(tuple(normalized_shape)), dtype)
        return self.R.nn.layer_norm(x, gamma, beta, list(range(rank - k, rank)), float(eps))

    def permute(self, node, x, *dims, **kw):
        dims = kw.get("dims", dims)
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        return self.R.permute_dims(x, [int(d) for d in dims])

    def _axes(self, node, dim):
        rank = len(ir.shape(node.args[0]))
        dims = dim if isinstance(dim, (tuple, list)) else [dim]
        return [int(d) % rank for d in dims]

    def mean(self, node, x, dim=None, keepdim=False, dtype=None):
        dim, keepdim = node.kwargs.get("dim", dim), node.kwargs.get("keepdim", keepdim)
        if dtype is not None or node.kwargs.get("dtype") is not None:
            raise _Unsupported("mean with dtype")
        return self.R.mean(x, None if dim is None else self._axes(node, dim), bool(keepdim))

    def reduce_sum(self, node, x, dim=None, keepdim=False, dtype=None):
        dim, keepdim = node.kwargs.get("dim", dim), node.kwargs.get("keepdim", keepdim)
        if dtype is not None or node.kwargs.get("dtype") is not None:
            raise _Unsupported("sum with dtype")
        return self.R.sum(x, None if dim is None else self._axes(node, dim), bool(keepdim))

    def hardtanh(self, node, x, min_val=-1.0, max_val=1.0, inplace=False):
        min_val = node.kwargs.get("min_val", min_val)
        max_val = node.kwargs.get("max_val", max_val)
        return self.R.clip(x, float(min_val), float(max_val))

    def hardswish(self, node, x, inplace=False):
        return self.R.multiply(x, self.bb.emit(self.hardsigmoid(node, x)))

    def hardsigmoid(self, node, x, inplace=False):
        dtype = self.dtype_of(node)
        shifted = self.bb.emit(self.R.add(x, self.const(3.0, dtype)))
        return self.R.divide(self.bb.emit(self.R.clip(shifted, 0.0, 6.0)), self.const(6.0, dtype))

    def gelu(self, node, x, approximate="none"):
        return self.R.nn.gelu_tanh(x) if node.kwargs.get("approximate", approximate) == "tanh" else self.R.nn.gelu(x)

    def max_pool2d(self, node, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                   return_indices=False):
        kw = node.kwargs
        kernel_size = kw.get("kernel_size", kernel_size)
        stride = kw.get("stride", stride) or kernel_size
        if kw.get("return_indices", return_indices):
            raise _Unsupported("max_pool2d with return_indices=True")
        return self.R.nn.max_pool2d(x, _pair(kernel_size), _pair(stride), _pair(kw.get("padding", padding)),
                                    _pair(kw.get("dilation", dilation)), bool(kw.get("ceil_mode", ceil_mode)))

    def avg_pool2d(self, node, x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                   divisor_override=None):
        if divisor_override is not None:
            raise _Unsupported("avg_pool2d with divisor_override")
        stride = stride or kernel_size
        return self.R.nn.avg_pool2d(x, _pair(kernel_size), _pair(stride), _pair(padding), (1, 1), bool(ceil_mode),
                                    bool(count_include_pad))

    def adaptive_avg_pool2d(self, node, x, output_size):
        return self.R.nn.adaptive_avg_pool2d(x, _pair(output_size))

    def reshape_to_output(self, node, x, *args, **kwargs):
        return self.R.reshape(self.env[node.args[0]], self.out_shape(node))

    def repeat(self, node, x, *reps):
        reps = reps[0] if len(reps) == 1 and isinstance(reps[0], (tuple, list)) else reps
        return self.R.tile(x, [int(r) for r in reps])

    def cat(self, node, tensors, dim=0):
        return self.R.concat([self.env[t] for t in tensors], axis=int(node.kwargs.get("dim", dim)))

    def binary(self, fn):
        def handler(node, a, b, *rest, **kw):
            if rest or kw.get("alpha", 1) != 1:
                raise _Unsupported("add/sub with alpha")
            dtype = self.dtype_of(node)
            return fn(self.value(node.args[0], dtype), self.value(node.args[1], dtype))

        return handler

    def getitem(self, node, x, index):
        if not isinstance(node.args[0], fx.Node) or ir.shape(node.args[0]) is None:
            raise _Unsupported("getitem on a non-tensor value")
        index = index if isinstance(index, tuple) else (index,)
        in_shape = ir.shape(node.args[0])
        axes, begin, end, strides, squeeze = [], [], [], [], []
        for axis, item in enumerate(index):
            if item is Ellipsis:
                raise _Unsupported("getitem with Ellipsis")
            if isinstance(item, slice):
                if item == slice(None):
                    continue
                start, stop, step = item.indices(in_shape[axis])
                axes.append(axis), begin.append(start), end.append(stop), strides.append(step)
            elif isinstance(item, int):
                i = item % in_shape[axis]
                axes.append(axis), begin.append(i), end.append(i + 1), strides.append(1)
                squeeze.append(axis)
            else:
                raise _Unsupported(f"getitem with index {item!r}")
        y = x
        if axes:
            y = self.bb.emit(self.R.strided_slice(x, axes, begin, end, strides))
        if squeeze:
            y = self.R.reshape(y, self.out_shape(node))
        return y

    def radial(self, node, module):
        """Hardball: x * r / max(|x|, r); Softball: x * rsqrt(1 + |x|^2 / r^2); |x| over dim 1."""
        from ..models.activations import Hardball, resolve_radius

        x = self.env[node.args[0]]
        dtype = self.dtype_of(node)
        r = resolve_radius(module.radius, self.out_shape(node)[1])
        squared = self.bb.emit(self.R.sum(self.bb.emit(self.R.multiply(x, x)), axis=[1], keepdims=True))
        if isinstance(module, Hardball):
            norm = self.bb.emit(self.R.sqrt(squared))
            factor = self.bb.emit(self.R.divide(self.const(r, dtype), self.bb.emit(self.R.maximum(norm, self.const(r, dtype)))))
        else:
            scaled = self.bb.emit(self.R.multiply(squared, self.const(1.0 / (r * r), dtype)))
            factor = self.bb.emit(self.R.rsqrt(self.bb.emit(self.R.add(scaled, self.const(1.0, dtype)))))
        return self.R.multiply(x, factor)

    def branch_product(self, node):
        names = ("x", "weight_a", "bias_a", "weight_b", "bias_b", "stride", "padding_b", "dilation_b", "groups_b")
        args = dict(zip(names, node.args))
        args.update(node.kwargs)
        site = {
            "name": node.name,
            "x": self.env[args["x"]],
            "x_shape": ir.shape(args["x"]),
            "weight_a": self.constant_tensor(args["weight_a"]),
            "bias_a": self.constant_tensor(args.get("bias_a")),
            "weight_b": self.constant_tensor(args["weight_b"]),
            "bias_b": self.constant_tensor(args.get("bias_b")),
            "stride": _pair(args["stride"]),
            "padding_b": _pair(args["padding_b"]),
            "dilation_b": _pair(args["dilation_b"]),
            "groups_b": int(args["groups_b"]),
            "out_shape": self.out_shape(node),
            "dtype": self.dtype_of(node),
        }
        if site["weight_a"] is None or site["weight_b"] is None:
            raise _Unsupported("branch_product with non-constant weights")
        self.fused_sites.append(site)
        return self.kernel_lowering(self, site)

    # ---- driver
    def convert(self):
        from tvm import relax

        unsupported: list[str] = []
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        params = []
        for node, example in zip(placeholders, self.example_inputs):
            dtype = str(example.dtype).replace("torch.", "")
            params.append(relax.Var(node.name, relax.TensorType(tuple(example.shape), dtype)))
        self.input_meta = [{"name": n.name, "shape": [int(s) for s in t.shape],
                            "dtype": str(t.dtype).replace("torch.", "")} for n, t in zip(placeholders, self.example_inputs)]
        outputs = None
        with self.bb.function("main", params):
            with self.bb.dataflow():
                for node, var in zip(placeholders, params):
                    self.env[node] = var
                for node in self.gm.graph.nodes:
                    if node.op == "placeholder":
                        continue
                    if node.op == "output":
                        outputs = node.args[0]
                        continue
                    try:
                        expr = self.convert_node(node)
                    except _Unsupported as err:
                        unsupported.append(f"{node.name}: {err} ({_describe(node)})")
                        continue
                    except KeyError as err:  # an input of this node was unsupported already
                        if isinstance(err.args[0], fx.Node) and any(err.args[0].name in u for u in unsupported):
                            continue
                        raise
                    if expr is None:
                        continue
                    self.env[node] = expr if node.op == "get_attr" else self.bb.emit(expr, name_hint=_var_name(node.name))
                if unsupported:
                    raise UnsupportedOpsError(
                        "TVM emitter", unsupported,
                        "What to do: mark the module a leaf and replace it with supported ops, run passes that "
                        "remove these ops, or use the ONNX emitter (qlfx.emit.onnx).",
                    )
                flat = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
                if not all(isinstance(o, fx.Node) for o in flat):
                    raise UnsupportedOpsError("TVM emitter", ["output: non-tensor output values"],
                                              "Return tensors (or a tuple of tensors) from forward.")
                self.num_outputs = len(flat)
                self.output_meta = [{"shape": list(self.out_shape(o)), "dtype": self.dtype_of(o)} for o in flat]
                result = relax.Tuple([self.env[o] for o in flat]) if isinstance(outputs, (tuple, list)) else self.env[flat[0]]
                gv = self.bb.emit_output(result)
            self.bb.emit_func_output(gv)
        return self.bb.get()

    def convert_node(self, node: fx.Node):
        if node.op == "get_attr":
            t = ir.get_tensor(self.gm, node)
            if not isinstance(t, torch.Tensor):
                raise _Unsupported("get_attr of a non-tensor")
            a = t.detach().cpu().contiguous().numpy()
            return self.relax.const(a, str(a.dtype))
        if node.op == "call_module":
            from ..models.activations import Hardball, Softball

            module = self.gm.get_submodule(node.target)
            if isinstance(module, (Hardball, Softball)):
                return self.radial(node, module)
            raise _Unsupported(f"opaque module {type(module).__name__}")
        if node.op == "call_function":
            if str(node.target) == BRANCH_PRODUCT_NAME:
                return self.branch_product(node)
            handler = self.handlers.get(node.target)
            if handler is None:
                raise _Unsupported(f"function {_target_name(node.target)}")
        elif node.op == "call_method":
            handler = self.methods.get(node.target)
            if handler is None:
                raise _Unsupported(f"method Tensor.{node.target}")
        else:
            raise _Unsupported(f"node kind {node.op}")
        args = [self.env[a] if isinstance(a, fx.Node) else a for a in node.args]
        kwargs = {k: (self.env[v] if isinstance(v, fx.Node) else v) for k, v in node.kwargs.items()}
        try:
            return handler(node, *args, **kwargs)
        except TypeError as err:  # arguments this converter does not know (a newer torch signature, say)
            raise _Unsupported(f"{_target_name(node.target)} with these arguments ({err})") from err


class _Unsupported(Exception):
    pass


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))
    return (int(v), int(v))


def _target_name(target) -> str:
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__name__', str(target))}".lstrip(".")


def _describe(node: fx.Node) -> str:
    origin = node.meta.get("qlfx_module") or (node.target if node.op == "call_module" else None)
    return f"{node.op} {_target_name(node.target) if node.op == 'call_function' else node.target}" + (
        f", from module '{origin}'" if origin else "")


def _var_name(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "v"


# ------------------------------------------------------------------------- branch product lowering
def lower_branch_product_relax(conv: _Converter, site: dict):
    """Fallback: conv1x1(x, Wa) + ba times conv(x, Wb, stride, padding_b, dilation_b, groups_b) + bb, as
    plain Relax ops (what the graph computed before fusion; no dedicated kernel)."""
    R = conv.R
    x = site["x"]

    def branch(weight, bias, padding, dilation, groups):
        y = conv.bb.emit(R.nn.conv2d(x, conv.relax.const(weight), strides=site["stride"], padding=padding,
                                     dilation=dilation, groups=groups))
        if bias is not None:
            y = conv.bb.emit(R.add(y, conv.relax.const(bias.reshape(1, -1, 1, 1))))
        return y

    a = branch(site["weight_a"], site["bias_a"], (0, 0), (1, 1), 1)
    b = branch(site["weight_b"], site["bias_b"], site["padding_b"], site["dilation_b"], site["groups_b"])
    return R.multiply(a, b)


@dataclass
class KernelRecord:
    """What happened to one fused-op site: which kernel, how it was tuned."""

    node: str
    kind: str  # "pointwise" / "depthwise"
    kernel: str  # name of the PrimFunc in the module, or "relax-fallback"
    trials_run: int = 0
    best_us: float | None = None
    from_database: bool = False
    note: str = ""


class _KernelLowering:
    """Lowers fused sites through qlfx.kernels (tuning each distinct shape once), or the Relax fallback."""

    def __init__(self, target, trials: int, database_dir: Path | None, progress: bool, use_kernels: bool):
        self.target = target
        self.trials = int(trials)
        self.database_dir = database_dir
        self.progress = progress
        self.records: list[KernelRecord] = []
        self.notes: list[str] = []
        self.by_spec: dict[Any, tuple[Any, KernelRecord]] = {}
        self.kernels = None
        if use_kernels:
            try:
                from .. import kernels

                _kernel_api(kernels)  # fails unless the kernel module has what we need
                self.kernels = kernels
            except Exception as err:  # noqa: BLE001 -- any failure here means: no usable kernel package
                self.notes.append(f"qlfx.kernels unavailable ({type(err).__name__}: {err}): "
                                  "fused ops lowered to Relax ops")

    def __call__(self, conv: _Converter, site: dict):
        kind = "pointwise" if site["weight_b"].shape[2:] == (1, 1) and site["groups_b"] == 1 else "depthwise"
        if self.kernels is None:
            self.records.append(KernelRecord(site["name"], kind, "relax-fallback"))
            return lower_branch_product_relax(conv, site)
        return _lower_with_kernel(self, conv, site, kind)


def _kernel_api(kernels_pkg):
    """(BranchProductSpec, schedule(spec, target) -> PrimFunc, pack_weights, tune or None) from qlfx.kernels."""
    mod = kernels_pkg
    if not hasattr(mod, "BranchProductSpec"):
        from ..kernels import branch_product as mod  # the package may not re-export yet
    tune = getattr(mod, "tune_branch_product", None) or getattr(kernels_pkg, "tune_branch_product", None)
    if tune is None:
        try:
            from ..kernels.tuning import tune_branch_product as tune
        except ImportError:
            tune = None
    return mod.BranchProductSpec, mod.schedule_branch_product, mod.pack_weights, tune


def _spec_for(Spec, site: dict, kind: str):
    """The kernel's BranchProductSpec for a fused site, or a reason why the kernel does not apply."""
    n, cin, h, w = site["x_shape"]
    wb = site["weight_b"]
    (sh, sw), (ph, pw), (dh, dw) = site["stride"], site["padding_b"], site["dilation_b"]
    if site["dtype"] != "float32":
        return None, f"dtype {site['dtype']} (the kernel is fp32)"
    if sh != sw or ph != pw or dh != dw or wb.shape[2] != wb.shape[3]:
        return None, "non-square stride/padding/dilation/kernel"
    try:
        return Spec(batch=n, in_channels=cin, height=h, width=w, out_channels=wb.shape[0], kind=kind, stride=sh,
                    kernel_size_b=wb.shape[2], padding_b=ph, dilation_b=dh, groups_b=site["groups_b"],
                    has_bias_a=site["bias_a"] is not None, has_bias_b=site["bias_b"] is not None), ""
    except ValueError as err:
        return None, str(err)


def _tuned_func(tuned) -> Any:
    for name in ("primfunc", "prim_func", "func", "scheduled", "mod"):
        value = getattr(tuned, name, None)
        if value is not None:
            return value["main"] if hasattr(value, "functions") else value
    raise TypeError(f"cannot find the scheduled PrimFunc on {type(tuned).__name__}")


def _first_attr(obj, names, default=None):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return default


def _lower_with_kernel(lowering: _KernelLowering, conv: _Converter, site: dict, kind: str):
    """call_tir of the (tuned or hand-scheduled) kernel of qlfx.kernels, weights packed once here."""
    from tvm import relax

    Spec, schedule, pack_weights, tune = _kernel_api(lowering.kernels)
    spec, why_not = _spec_for(Spec, site, kind)
    if spec is None:
        lowering.records.append(KernelRecord(site["name"], kind, "relax-fallback", note=why_not))
        return lower_branch_product_relax(conv, site)
    if spec not in lowering.by_spec:
        record = KernelRecord(site["name"], kind, spec.name())
        can_tune = tune is not None and lowering.trials > 0 and lowering.target.kind.name == "llvm"
        if can_tune:
            def report(done: int, total: int, best_gflops: float, name=spec.name()) -> None:
                if lowering.progress:
                    what = "from the database" if total == 0 else f"trials {done}/{total}"
                    _say(f"[qlfx.tvm] kernel {name}: {what}, best {best_gflops:.1f} GFLOP/s")

            tuned = tune(spec, lowering.target, lowering.trials, str(lowering.database_dir / "branch-product"),
                         report)
            func = _tuned_func(tuned)
            record.trials_run = int(_first_attr(tuned, ("trials_run", "trials_measured", "trials"), 0))
            best = _first_attr(tuned, ("best_us",))
            if best is None and _first_attr(tuned, ("best_seconds", "best_latency_s")) is not None:
                best = 1e6 * float(_first_attr(tuned, ("best_seconds", "best_latency_s")))
            record.best_us = None if best is None else float(best)
            record.from_database = bool(_first_attr(tuned, ("from_database", "cached"), record.trials_run == 0))
        else:
            func, _ = schedule(spec, lowering.target)
            record.note = "hand schedule" + (
                " (qlfx.kernels has no tune_branch_product)" if tune is None else
                " (tuning a cuda kernel needs a GPU to measure on)" if lowering.trials > 0 else "")
        # Own symbol (the kernel names itself "main", which is the Relax entry here); already scheduled,
        # so the tuner and dlight leave it alone; opaque, so FuseOps does not merge it with neighbours.
        func = func.with_attr("global_symbol", spec.name()).with_attr("tirx.is_scheduled", True)
        func = func.with_attr("op_pattern", 8)
        gvar = conv.bb.add_func(func, spec.name())
        lowering.by_spec[spec] = (gvar, record)
    gvar, first = lowering.by_spec[spec]
    lowering.records.append(KernelRecord(site["name"], kind, first.kernel, first.trials_run if first.node == site["name"] else 0,
                                         first.best_us, first.from_database or first.node != site["name"], first.note))
    packed = pack_weights(spec, site["weight_a"], site["bias_a"], site["weight_b"], site["bias_b"])
    args = [site["x"]] + [relax.const(np.ascontiguousarray(a, dtype="float32")) for a in packed]
    return conv.R.call_tir(gvar, args, relax.TensorType(tuple(spec.output_shape), "float32"))


# ---------------------------------------------------------------------------- other-op tuning
@dataclass
class TuningSummary:
    tasks_total: int = 0
    tasks_from_database: int = 0
    tasks_tuned: int = 0
    trials_run: int = 0
    seconds: float = 0.0


def _database(database_dir: Path):
    from tvm.s_tir import meta_schedule as ms

    database_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(
        path_workload=str(database_dir / "database_workload.json"),
        path_tuning_record=str(database_dir / "database_tuning_record.json"),
        module_equality="structural",
    )


def tune_module_tasks(mod, target, trials_per_task: int, database_dir: Path, progress: bool) -> TuningSummary:
    """MetaSchedule-tune every unscheduled TIR task of ``mod`` the database has no record for.

    Tasks already in the database (same structure, same target) are not tuned again.
    """
    from tvm.s_tir import meta_schedule as ms

    summary = TuningSummary()
    start = time.perf_counter()
    database = _database(database_dir)
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if not _is_scheduled_task(t)]
    summary.tasks_total = len(tasks)
    todo = []
    for task in tasks:
        if database.query_tuning_record(task.dispatched[0], target, "main") is not None:
            summary.tasks_from_database += 1
        else:
            todo.append(task)
    if progress:
        _say(f"[qlfx.tvm] other ops: {len(tasks)} tasks, {summary.tasks_from_database} from the database, "
             f"{len(todo)} to tune x {trials_per_task} trials")
    if todo and trials_per_task > 0:
        import logging

        # MetaSchedule prints every task table to stdout at INFO; keep its console quiet (its log files in
        # <database>/logs keep everything) unless the caller configured that logger.
        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        if ms_logger.level == logging.NOTSET:
            ms_logger.setLevel(logging.WARNING)
        work_dir = str(database_dir / "logs")
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(todo, work_dir, seed=0)
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir,
                      max_trials_global=trials_per_task * len(contexts), max_trials_per_task=trials_per_task,
                      num_trials_per_iter=min(64, trials_per_task), database=database,
                      cost_model=_cost_model(), **_builder_runner())
        summary.tasks_tuned = len(contexts)
        summary.trials_run = trials_per_task * len(contexts)
    summary.seconds = time.perf_counter() - start
    if progress and todo:
        _say(f"[qlfx.tvm] other ops: tuned {summary.tasks_tuned} tasks in {summary.seconds:.0f}s "
             f"(logs in {database_dir / 'logs'})")
    return summary


def _is_scheduled_task(task) -> bool:
    """A task whose PrimFunc is already scheduled (our fused kernels): nothing for the tuner to do."""
    for mod in (task.mod, task.dispatched[0]):
        for func in mod.functions.values():
            if func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False)):
                return True
    return False


def _builder_runner() -> dict:
    """In-process builder/runner of qlfx.kernels.tuning when present: MetaSchedule's LocalBuilder starts
    worker processes that each import tvm's tensor intrinsics (~30 s of CPU apiece on a small machine),
    which dominates small tuning budgets. Falls back to MetaSchedule's local ones."""
    try:
        from ..kernels.tuning import InProcessBuilder, InProcessRunner

        return {"builder": InProcessBuilder(), "runner": InProcessRunner()}
    except ImportError:
        return {}


def _cost_model() -> str:
    """MetaSchedule's default "xgb" cost model needs xgboost; fall back to random search without it."""
    try:
        import xgboost  # noqa: F401

        return "xgb"
    except ImportError:
        return "random"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- the module
class TVMModule:
    """A compiled graph. ``module(*inputs)``: numpy in -> numpy out, torch in -> torch out (CPU tensors);
    a single graph output is returned bare, several as a tuple.

    Attributes: ``target`` (tvm Target), ``executable`` (relax VM executable), ``kernels`` (a
    KernelRecord per fused site), ``tuning`` (TuningSummary of the other ops or None), ``notes``,
    ``build_seconds``, ``relax_module`` (the IRModule before the Relax pipeline), ``inputs``/``outputs``.
    """

    def __init__(self, executable, target, input_meta, output_meta, multi_output: bool, kernels, tuning, notes,
                 relax_module, build_seconds: float):
        self.executable = executable
        self.target = target
        self.inputs = input_meta
        self.outputs = output_meta
        self.multi_output = multi_output
        self.kernels = kernels
        self.tuning = tuning
        self.notes = notes
        self.relax_module = relax_module
        self.build_seconds = build_seconds
        self._runner = None

    @property
    def device_kind(self) -> str:
        return "cuda" if self.target.kind.name == "cuda" else "cpu"

    @property
    def runner(self) -> tvm_runtime.VMRunner:
        """The VM (created on first use: a cuda module needs a GPU only when it is run)."""
        if self._runner is None:
            device = tvm_runtime.device_for(self.device_kind)
            if not device.exist:
                raise RuntimeError(f"this module was built for {self.target.kind.name} but no such device is present "
                                   "here; export it and run it on a machine that has one")
            self._runner = tvm_runtime.VMRunner(self.executable, device, self.inputs, len(self.outputs))
        return self._runner

    def __call__(self, *inputs):
        as_torch = any(isinstance(t, torch.Tensor) for t in inputs)
        arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in inputs]
        outs = self.runner(*arrays)
        if as_torch:
            outs = [torch.from_numpy(o) for o in outs]
        return tuple(outs) if self.multi_output else outs[0]

    def source(self, kind: str = "cuda") -> str:
        """Generated device source (cuda) or LLVM IR of the kernels, for inspection."""
        lib = self.executable.mod if hasattr(self.executable, "mod") else self.executable
        texts = []
        for m in [lib] + list(getattr(lib, "imports", [])):
            for sub in [m] + list(getattr(m, "imports", [])):
                try:
                    texts.append(sub.inspect_source())
                except Exception:  # noqa: BLE001 -- modules without source
                    pass
        return "\n".join(texts)

    def metadata(self) -> dict:
        return {
            "format": tvm_runtime.FORMAT, "version": tvm_runtime.FORMAT_VERSION, "entry": "main",
            "inputs": self.inputs, "outputs": self.outputs, "num_outputs": len(self.outputs),
            "multi_output": self.multi_output, "params": "baked-in", "target": str(self.target),
            "device": self.device_kind,
            "kernels": [r.__dict__ for r in self.kernels],
        }

    def export(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (.so) and its metadata ``.json``, each atomically. Returns the .so path."""
        so = tvm_runtime.library_path(path)
        with atomic_output(so) as tmp:
            self.executable.export_library(str(tmp))
        atomic_write(tvm_runtime.metadata_path(so), json.dumps(self.metadata(), indent=2))
        return so

    def __repr__(self) -> str:
        return (f"TVMModule(target={self.target.kind.name}, fused_kernels={len(self.kernels)}, "
                f"inputs={[tuple(i['shape']) for i in self.inputs]})")


# ----------------------------------------------------------------------------------------- build
def to_relax(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], kernel_lowering: Callable | None = None):
    """The Relax IRModule of ``gm`` (fused ops through ``kernel_lowering``; Relax ops by default) and
    the converter (input/output metadata)."""
    example_inputs = ir.check_example_inputs(example_inputs)
    conv = _Converter(gm, example_inputs, kernel_lowering or (lambda c, s: lower_branch_product_relax(c, s)))
    return conv.convert(), conv


def build_tvm(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    target: Any = "llvm",
    tune_trials: int = 0,
    tuning_db: str | os.PathLike | None = None,
    progress: bool = True,
    tune_other_ops: bool = False,
    other_ops_trials: int | None = None,
    use_kernels: bool = True,
) -> TVMModule:
    """Compile the canonical graph ``gm`` for ``target`` ("llvm", "cuda", a dict or a tvm Target).

    ``tune_trials``: MetaSchedule trials per fused-kernel shape (0: the hand schedule).
    ``tuning_db``: folder of the persistent JSON tuning database (default ~/.cache/qlfx/tvm-tuning);
    shapes it already holds are not tuned again. ``tune_other_ops``: also tune the remaining TIR tasks
    (``other_ops_trials`` per task, default ``tune_trials``) with the same database.
    """
    import tvm
    from tvm import relax

    start = time.perf_counter()
    tgt = make_target(target)
    database_dir = Path(tuning_db) if tuning_db is not None else Path.home() / ".cache" / "qlfx" / "tvm-tuning"
    lowering = _KernelLowering(tgt, tune_trials, database_dir, progress, use_kernels)
    mod, conv = to_relax(gm, example_inputs, lowering)
    relax_module = mod
    is_gpu = tgt.kind.name == "cuda"
    pipeline = _backend_pipeline(tgt)
    with tgt:
        # Relax's default pipeline for the target (relax.get_default_pipeline), split open so that the
        # tuning database is applied after fusion and before cuda's default (dlight) schedules.
        mod = tvm.transform.Sequential(pipeline.library_dispatch_passes(tgt) + _legalize_passes_without_dlight())(mod)
    tuning = None
    other_trials = tune_trials if other_ops_trials is None else other_ops_trials
    if tune_other_ops and other_trials > 0:
        tuning = tune_module_tasks(mod, tgt, other_trials, database_dir / "other-ops", progress)
    if tune_other_ops:
        with tgt, _database(database_dir / "other-ops"):
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    with tgt:
        if is_gpu:
            from tvm.s_tir import dlight as dl

            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        mod = tvm.transform.Sequential(pipeline.dataflow_lower_passes(tgt) + pipeline.finalize_passes(tgt))(mod)
    executable = tvm.compile(mod, target=tgt, relax_pipeline=None)
    return TVMModule(executable, tgt, conv.input_meta, conv.output_meta,
                     isinstance(_output_arg(gm), (tuple, list)), lowering.records, tuning, lowering.notes,
                     relax_module, time.perf_counter() - start)


def _backend_pipeline(target):
    """The module holding the target's Relax pass lists (tvm 0.27's relax.pipeline.dataflow_lower_passes
    fails for llvm: cpu_generic does not re-export it, so take the backend's pipeline module directly)."""
    from tvm import relax

    if target.kind.name == "cuda":
        return relax.backend.cuda.pipeline
    return relax.backend.cpu_generic.pipeline


def _legalize_passes_without_dlight():
    from tvm import relax

    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()]


def _output_arg(gm: fx.GraphModule):
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]
