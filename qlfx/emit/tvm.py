"""Emit the qlfx IR as a compiled TVM Relax module.

    build_tvm(gm, example_inputs, target) -> TVMModule

1. IR -> Relax: the rewritten GraphModule is re-exported (:func:`qlfx.capture.to_exported_program`,
   symbolic batch when the graph was captured with ``dynamic_batch``), decomposed to core ATen
   (``ExportedProgram.run_decompositions()``, what TVM's frontend runs, with qlfx's own ops kept whole:
   they are CompositeImplicit and would otherwise decompose into their definitions) and converted by TVM's
   ``relax.frontend.torch.from_exported_program``; weights are bound as Relax constants. Only qlfx's own
   ops get converters here (``custom_convert_map``). Every op the importer has no converter for is
   listed at once, at the qlfx node it came from, in an ``UnsupportedOpsError``, before any work.
2. ``torch.ops.qlfx.branch_product`` (conv1x1(x) * conv_b(x), see qlfx/ops.py) becomes ``call_tir`` of
   the hand-written kernel of :mod:`qlfx.kernels` (weights packed once, here), tuned with MetaSchedule
   against a persistent JSON database (a second build of the same shapes tunes nothing); a site the
   kernel does not cover (dtype, non-square windows), or ``use_kernels=False``, becomes two Relax
   conv2d and a multiply (stated in the site's KernelRecord). Every other 1x1 convolution (groups 1, no
   padding, stored weights, fp32) runs on the same packed GEMM kernel (``kind="conv1x1"``, a record per
   site too): TVM's legalized conv re-streams the input once per channel tile. A depthwise conv whose
   input repeats channels (``repeat_interleave``, e.g. from expand-depthwise, which onnxruntime needs)
   reads channel o // m itself instead of a repeated copy. A depthwise conv (reading x, or x's
   channels repeated) whose only reader is a 1x1 conv, possibly through a relu / hardtanh / clamp,
   runs with that conv as one ``separable`` kernel (llvm targets). An ``add`` whose one operand is such a
   kernel's output (read by the add alone) and whose other has the same shape becomes that kernel
   with the add in its epilogue (``has_residual``). ``alpha`` of add / sub / rsub is folded into the
   operand first: TVM's frontend converts them without it. ``hardball`` / ``softball`` become Relax
   ops: x * r / max(|x|, r) and x * rsqrt(1 + |x|^2 / r^2), |x| over dim 1, r = radius or sqrt(C).
3. The rest goes through Relax's default pipeline for the target (legalize, fuse, and for cuda the
   dlight default GPU schedules; for llvm qlfx's designed CPU schedules, qlfx.kernels.cpu_schedules:
   TVM 0.27 has none for x86). Optionally (``tune_other_ops``) the remaining TIR tasks are tuned
   with MetaSchedule against the same database (qlfx.kernels.module_tuning: FLOPs-weighted budget,
   xgb cost model, the default schedule as the record to beat), skipping tasks the database has.
   Tuning records apply to every static-shape llvm build, tuned or not: the user's database first,
   then the records kept with qlfx (qlfx/tuning_records/<target key>), each for this target only.
4. ``TVMModule`` runs on numpy / torch inputs; ``.export(path)`` writes ``path.so`` + ``path.json``
   that :func:`qlfx.emit.tvm_runtime.load` runs without torch. With a symbolic batch the module takes
   any batch size (the fused kernels have a symbolic batch too; they are tuned at the example's).
"""
from __future__ import annotations

import dataclasses
import json
import operator
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind

from .. import capture, emit, ir
from ..errors import QlfxError, UnsupportedOpsError, UsageError
from ..io import atomic_output, atomic_write
from ..ops import branch_product_kind, radius_of
from . import tvm_runtime

# custom_convert_map keys: TVM's importer looks converters up by ``node.target.__name__``
BRANCH_PRODUCT = "branch_product.default"
CONVOLUTION = "convolution.default"
ADD = "add.Tensor"
HARDBALL = "hardball.default"
SOFTBALL = "softball.default"


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


# ------------------------------------------------------------------------------- qlfx's ops in Relax
@dataclass
class KernelRecord:
    """What happened to one kernel site (a branch_product, a 1x1 conv, a depthwise conv + 1x1 conv):
    which kernel, how it was tuned."""

    node: str
    # branch products: "pointwise" / "depthwise" / "other"; 1x1 convs: "conv1x1"; dw + 1x1: "separable"
    kind: str
    kernel: str  # name of the PrimFunc in the module, or "relax-fallback"
    trials_run: int = 0
    best_us: float | None = None
    from_database: bool = False
    note: str = ""

    @property
    def is_branch_product(self) -> bool:
        return self.kind not in ("conv1x1", "separable")


def _radial(node: fx.Node, importer, hard: bool):
    """hardball: x * r / max(|x|, r); softball: x * rsqrt(1 + |x|^2 / r^2); |x| the norm over dim 1."""
    from tvm import relax

    R, emit = relax.op, importer.block_builder.emit
    x = importer.env[node.args[0]]
    radius = ir.op_args(node)["radius"]
    r = radius_of(ir.val(node.args[0]), radius)
    dtype = x.ty.dtype
    squared = emit(R.sum(emit(R.multiply(x, x)), axis=[1], keepdims=True))
    if hard:
        norm = emit(R.sqrt(squared))
        factor = emit(R.divide(relax.const(r, dtype), emit(R.maximum(norm, relax.const(r, dtype)))))
    else:
        scaled = emit(R.multiply(squared, relax.const(1.0 / (r * r), dtype)))
        factor = emit(R.rsqrt(emit(R.add(scaled, relax.const(1.0, dtype)))))
    return emit(R.multiply(x, factor))


def _relax_branch_product(node: fx.Node, importer):
    """conv1x1(x, Wa) + ba times conv(x, Wb, stride, padding_b, dilation_b, groups_b) + bb in Relax ops
    (what the graph computed before fusion; no dedicated kernel)."""
    from tvm import relax

    R, emit, env = relax.op, importer.block_builder.emit, importer.env
    a = ir.op_args(node)
    x = env[a["x"]]

    def branch(weight, bias, padding, dilation, groups):
        y = emit(R.nn.conv2d(x, env[weight], strides=a["stride"], padding=padding, dilation=dilation,
                             groups=groups))
        if bias is not None:
            y = emit(R.add(y, emit(R.reshape(env[bias], (1, -1, 1, 1)))))
        return y

    return emit(R.multiply(branch(a["weight_a"], a["bias_a"], (0, 0), (1, 1), 1),
                           branch(a["weight_b"], a["bias_b"], a["padding_b"], a["dilation_b"], a["groups_b"])))


_ALPHA_OPS = {torch.ops.aten.add.Tensor: "other", torch.ops.aten.add.Scalar: "other",
              torch.ops.aten.sub.Tensor: "other", torch.ops.aten.sub.Scalar: "other",
              torch.ops.aten.rsub.Tensor: "self", torch.ops.aten.rsub.Scalar: "self"}


def _fold_alpha(graph_module: fx.GraphModule) -> None:
    """``add(a, b, alpha=k)`` -> ``add(a, k * b)`` (likewise sub; rsub scales ``self``), in place.

    TVM's PyTorch frontend converts add / sub / rsub without reading ``alpha`` (0.27), so
    ``torch.add(x, y, alpha=2)`` would silently compute ``x + y``.
    """
    graph = graph_module.graph
    for node in list(graph.nodes):
        scaled = _ALPHA_OPS.get(node.target) if node.op == "call_function" else None
        alpha = ir.op_args(node).get("alpha", 1) if scaled else 1
        if alpha == 1:
            continue
        operand = ir.op_args(node)[scaled]
        if isinstance(operand, fx.Node):
            with graph.inserting_before(node):
                product = graph.call_function(torch.ops.aten.mul.Tensor, (operand, alpha))
            product.meta = {**operand.meta, "val": operand.meta["val"] * alpha}
        else:
            product = operand * alpha
        ir.set_op_args(node, **{scaled: product, "alpha": 1})
    graph_module.recompile()


def _same_shape(a, b) -> bool:
    """Equal shapes, a symbolic batch size compared by name."""
    return a is not None and b is not None and len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def _repeated_channels(conv_args: dict):
    """(x, m) when a depthwise convolution's input repeats every channel of x m times (what
    ``repeat_interleave(x, m, 1)`` decomposes to: unsqueeze(2) -> expand -> clone -> view, each used
    once; expand-depthwise writes it for onnxruntime): the same conv with groups C reads channel
    o // m directly, and the repeated copy (a kernel of its own in TVM, 4 ms on qlnet50) goes away."""
    view, groups = conv_args["input"], conv_args["groups"]
    chain = [view]
    for op in ("clone", "expand", "unsqueeze"):
        producer = chain[-1].args[0] if isinstance(chain[-1], fx.Node) and chain[-1].args else None
        if not ir.is_op(producer, getattr(torch.ops.aten, op)) or len(producer.users) != 1:
            return None
        chain.append(producer)
    if not ir.is_op(view, torch.ops.aten.view, torch.ops.aten.reshape, torch.ops.aten._unsafe_view) \
            or len(view.users) != 1 or chain[-1].args[1:] != (2,):
        return None
    x = chain[-1].args[0]
    shape, expanded = ir.shape(x), ir.shape(chain[2])
    if shape is None or expanded is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        return None
    n, channels, h, w = shape
    multiplier = expanded[2]
    if list(expanded[3:]) != [h, w] or expanded[1] != channels or not isinstance(multiplier, int) \
            or list(ir.shape(view)[1:]) != [channels * multiplier, h, w]:
        return None
    weight = ir.shape(conv_args["weight"])
    if groups != channels * multiplier or weight is None or weight[1] != 1 or conv_args["transposed"]:
        return None
    return x, multiplier


def _clamp_bounds(node: Any) -> tuple[float | None, float | None] | None:
    """(min, max) of a relu / hardtanh / clamp with constant bounds, else None."""
    if ir.is_op(node, torch.ops.aten.relu.default):
        return 0.0, None
    a = ir.op_args(node) if isinstance(node, fx.Node) else {}
    if ir.is_op(node, torch.ops.aten.hardtanh.default):
        bounds = a["min_val"], a["max_val"]
    elif ir.is_op(node, torch.ops.aten.clamp.default):
        bounds = a.get("min"), a.get("max")
    else:
        return None
    if not all(b is None or isinstance(b, (int, float)) for b in bounds):
        return None
    return tuple(None if b is None else float(b) for b in bounds)


class _Lowering:
    """The ``custom_convert_map`` for qlfx's ops, and what happened at each branch_product site:
    kernels of qlfx.kernels (each distinct shape scheduled and tuned once) or the Relax fallback."""

    def __init__(self, gm: fx.GraphModule, ep: torch.export.ExportedProgram, target, trials: int,
                 database_dir: Path, progress: bool, use_kernels: bool, tuning_batch: int, rpc=None):
        self.gm = gm
        self.rpc = rpc  # qlfx.kernels.rpc.RPCSettings: measure candidates on the tracker's servers
        self.target = target
        self.trials = int(trials)
        self.database_dir = database_dir
        self.progress = progress
        self.use_kernels = use_kernels
        self.tuning_batch = tuning_batch
        self.records: list[KernelRecord] = []
        self.by_spec: dict[Any, tuple[Any, KernelRecord]] = {}
        self.weights = _stored_tensors(ep)
        # 1x1 conv -> (depthwise conv, clamp or None, spec): one separable kernel computes both
        self.separable = self._separable_sites(ep.graph) if use_kernels and target.kind.name == "llvm" else {}
        self.absorbed = {n for dw, clamp, _ in self.separable.values() for n in (dw, clamp) if n is not None}
        # add -> (kernel site, residual): the add runs as the site's kernel epilogue
        self.residual_adds = self._residual_adds(ep.graph) if use_kernels else {}
        self.sites_in_adds = {site for site, _ in self.residual_adds.values()}
        self._default_converters: dict | None = None

    def convert_map(self) -> dict:
        return {BRANCH_PRODUCT: self.branch_product, CONVOLUTION: self.convolution, ADD: self.add,
                **{name: self._unless_absorbed(name) for name in ("relu.default", "hardtanh.default", "clamp.default")},
                HARDBALL: lambda node, importer: _radial(node, importer, hard=True),
                SOFTBALL: lambda node, importer: _radial(node, importer, hard=False)}

    def branch_product(self, node: fx.Node, importer):
        if node in self.sites_in_adds:  # emitted by the add that reads it, with the add in its epilogue
            return None
        a = ir.op_args(node)
        name = emit.origin(self.gm, node).name
        spec, why_not = self._spec(node, self._product_kind(a))
        if spec is None:
            self.records.append(KernelRecord(name, self._product_kind(a), "relax-fallback", note=why_not))
            return _relax_branch_product(node, importer)
        return self._call_kernel(node, importer, spec)

    @staticmethod
    def _product_kind(a: dict) -> str:
        return branch_product_kind(ir.shape(a["weight_b"]), a["groups_b"], ir.channels(a["x"])) or "other"

    def convolution(self, node: fx.Node, importer):
        """A 1x1 conv (groups 1, no padding, stored weights, fp32) runs on the packed GEMM kernel
        (``kind="conv1x1"``); every other convolution goes to TVM's own converter."""
        if node in self.sites_in_adds or node in self.absorbed:  # emitted by the op that reads it
            return None
        a = ir.op_args(node)
        spec = self._site_spec(node) if self.use_kernels else None
        if spec is not None:
            return self._call_kernel(node, importer, spec)
        repeated = _repeated_channels(a) if self.use_kernels else None
        if repeated is not None:  # the depthwise conv reads channel o // m itself: no repeated copy
            x, multiplier = repeated
            env = importer.env
            return importer._conv2d_impl(env[x], env[a["weight"]], None if a["bias"] is None else env[a["bias"]],
                                         a["stride"], a["padding"], a["dilation"], a["groups"] // multiplier)
        return importer._convolution(node)

    def add(self, node: fx.Node, importer):
        """A residual add of a kernel site's output: the site's kernel with the add in its epilogue;
        every other add goes to TVM's own converter."""
        if node not in self.residual_adds:
            from tvm import relax

            return importer._binary_op(relax.op.add, operator.add)(node)
        site, residual = self.residual_adds[node]
        spec = dataclasses.replace(self._site_spec(site), has_residual=True)
        return self._call_kernel(site, importer, spec, residual=residual)

    def _site_spec(self, node: fx.Node):
        """The kernel spec of a branch_product or 1x1 convolution site, or None when no kernel takes it."""
        a = ir.op_args(node)
        if ir.is_op(node, torch.ops.qlfx.branch_product):
            return self._spec(node, self._product_kind(a))[0]
        if node in self.separable:
            return self.separable[node][2]
        if ir.is_op(node, torch.ops.aten.convolution):
            return self._conv1x1_spec(node, a)
        return None

    def _unless_absorbed(self, name: str):
        """The converter of ``name``: nothing for a node a separable kernel computes, else TVM's own."""
        def convert(node: fx.Node, importer):
            if node in self.absorbed:
                return None
            if self._default_converters is None:
                self._default_converters = importer.create_convert_map()
            return self._default_converters[name](node)
        return convert

    def _separable_sites(self, graph: fx.Graph) -> dict:
        """1x1 conv -> (depthwise conv, clamp or None, spec) for ``conv1x1(clamp?(dwconv(x)))``: the
        depthwise conv reads x (or x's channels repeated, ``repeat_interleave``), each intermediate
        is read by the next op alone, weights are stored, fp32, the 1x1 conv has stride 1."""
        from ..kernels import BranchProductSpec

        sites = {}
        for node in graph.nodes:
            if not ir.is_op(node, torch.ops.aten.convolution):
                continue
            a = ir.op_args(node)
            pointwise = self._conv1x1_spec(node, a)
            hidden = a["input"]
            bounds = _clamp_bounds(hidden)
            clamp, dw = (hidden, hidden.args[0]) if bounds is not None else (None, hidden)
            if pointwise is None or pointwise.stride != 1 or len(hidden.users) != 1 \
                    or not ir.is_op(dw, torch.ops.aten.convolution) or len(dw.users) != 1:
                continue
            d = ir.op_args(dw)
            weight, bias = d["weight"], d["bias"]
            if d["transposed"] or ir.dtype(dw) != torch.float32 or weight.name not in self.weights \
                    or (bias is not None and bias.name not in self.weights):
                continue
            repeated = _repeated_channels(d)
            x, multiplier = repeated if repeated is not None else (d["input"], 1)
            shape, kernel = ir.shape(x), ir.shape(weight)
            depthwise_in = ir.shape(d["input"])[1]  # the repeated channels, when repeated
            if kernel[1] != 1 or d["groups"] != depthwise_in or kernel[0] % depthwise_in or len(shape) != 4 \
                    or kernel[2] != kernel[3]:
                continue
            (sh, sw), (ph, pw), (dh, dw_) = ir.pair(d["stride"]), ir.pair(d["padding"]), ir.pair(d["dilation"])
            if sh != sw or ph != pw or dh != dw_ or not all(isinstance(v, int) for v in shape[1:]):
                continue
            try:
                spec = BranchProductSpec(
                    batch=shape[0] if isinstance(shape[0], int) else None, in_channels=shape[1], height=shape[2],
                    width=shape[3], out_channels=pointwise.out_channels, kind="separable", stride=sh,
                    kernel_size_b=kernel[2], padding_b=ph, dilation_b=dh, groups_b=shape[1],
                    has_bias_a=pointwise.has_bias_a, has_bias_b=bias is not None, mid_channels=kernel[0],
                    clamp_min=None if bounds is None else bounds[0], clamp_max=None if bounds is None else bounds[1])
            except ValueError:  # e.g. a padding that changes the size: the convs stay apart
                continue
            sites[node] = (dw, clamp, spec)
        return sites

    def _residual_adds(self, graph: fx.Graph) -> dict:
        """add -> (site, residual) for every ``add(site, residual)`` (either order, alpha 1) where site is
        a kernel site that the add alone reads and residual a tensor of the same shape and dtype (no
        broadcast: the epilogue reads it element for element)."""
        plan = {}
        for node in graph.nodes:
            if not ir.is_op(node, torch.ops.aten.add.Tensor) or ir.op_args(node).get("alpha", 1) != 1:
                continue
            lhs, rhs = node.args[:2]
            for site, residual in ((lhs, rhs), (rhs, lhs)):
                if isinstance(site, fx.Node) and isinstance(residual, fx.Node) and site is not residual \
                        and len(site.users) == 1 and site not in {s for s, _ in plan.values()} \
                        and _same_shape(ir.shape(site), ir.shape(residual)) and ir.dtype(site) == ir.dtype(residual) \
                        and self._site_spec(site) is not None:
                    plan[node] = (site, residual)
                    break
        return plan

    def _call_kernel(self, node: fx.Node, importer, spec, residual: fx.Node | None = None):
        """call_tir of the kernel for ``spec`` at the site ``node`` (a branch_product or a 1x1 conv), its
        weights packed here, plus the residual the epilogue adds; records the site."""
        a = ir.op_args(node)
        if ir.is_op(node, torch.ops.qlfx.branch_product):
            x_node, weight_nodes = a["x"], [a[k] for k in ("weight_a", "bias_a", "weight_b", "bias_b")]
        elif spec.kind == "separable":
            dw = ir.op_args(self.separable[node][0])
            repeated = _repeated_channels(dw)
            x_node = repeated[0] if repeated is not None else dw["input"]
            weight_nodes = [a["weight"], a["bias"], dw["weight"], dw["bias"]]
        else:
            x_node, weight_nodes = a["input"], [a["weight"], a["bias"], None, None]
        name = emit.origin(self.gm, node).name
        gvar, record = self._kernel(importer, spec)
        if record.node:  # a shape seen before in this graph: the same kernel, nothing tuned for this site
            record = KernelRecord(name, spec.kind, record.kernel, 0, record.best_us, record.from_database,
                                  f"the kernel of {record.node}")
        record.node = name
        self.records.append(record)
        from tvm import relax

        from ..kernels import pack_weights

        packed = pack_weights(spec, *(None if w is None else self.weights[w.name] for w in weight_nodes))
        x = importer.env[x_node]
        out_shape = [x.ty.shape[0]] + list(spec.output_shape[1:])
        args = [x] + [relax.const(np.ascontiguousarray(p, dtype="float32")) for p in packed]
        args += [] if residual is None else [importer.env[residual]]
        return importer.block_builder.emit(relax.op.call_tir(gvar, args, relax.TensorType(out_shape, "float32")))

    def _spec(self, node: fx.Node, kind: str):
        """The kernel's BranchProductSpec for a site (batch None when symbolic), or (None, why not)."""
        if not self.use_kernels:
            return None, "use_kernels=False"
        if kind == "other":
            return None, "a b-branch no qlfx kernel covers (neither pointwise nor depthwise)"
        from ..kernels import BranchProductSpec

        a = ir.op_args(node)
        if any(a[k] is not None and a[k].name not in self.weights for k in ("weight_a", "bias_a", "weight_b", "bias_b")):
            return None, "weights computed in the graph (the kernel takes stored weights, packed once)"
        if ir.dtype(node) != torch.float32:
            return None, f"dtype {ir.dtype(node)} (the kernel is fp32)"
        n, cin, h, w = ir.shape(a["x"])
        wb = ir.shape(a["weight_b"])
        (sh, sw), (ph, pw), (dh, dw) = ir.pair(a["stride"]), ir.pair(a["padding_b"]), ir.pair(a["dilation_b"])
        if sh != sw or ph != pw or dh != dw or wb[2] != wb[3]:
            return None, "non-square stride/padding/dilation/kernel"
        try:
            return BranchProductSpec(batch=n if isinstance(n, int) else None, in_channels=cin, height=h, width=w,
                                     out_channels=wb[0], kind=kind, stride=sh, kernel_size_b=wb[2], padding_b=ph,
                                     dilation_b=dh, groups_b=a["groups_b"], has_bias_a=a["bias_a"] is not None,
                                     has_bias_b=a["bias_b"] is not None), ""
        except ValueError as err:
            return None, str(err)

    def _conv1x1_spec(self, node: fx.Node, a: dict):
        """The conv1x1 kernel's spec for an aten.convolution site, or None when it is not one."""
        from ..kernels import BranchProductSpec

        weight, bias = a["weight"], a["bias"]
        if a["transposed"] or a["groups"] != 1 or ir.dtype(node) != torch.float32:
            return None
        if not isinstance(weight, fx.Node) or weight.name not in self.weights \
                or (bias is not None and (not isinstance(bias, fx.Node) or bias.name not in self.weights)):
            return None
        shape = ir.shape(a["input"])
        if len(shape) != 4 or tuple(ir.shape(weight)[2:]) != (1, 1) or any(p != 0 for p in a["padding"]):
            return None
        n, cin, h, w = shape
        stride = list(a["stride"])
        if len(set(stride)) != 1 or not all(isinstance(d, int) for d in (cin, h, w)):
            return None
        return BranchProductSpec(batch=n if isinstance(n, int) else None, in_channels=cin, height=h, width=w,
                                 out_channels=ir.shape(weight)[0], kind="conv1x1", stride=stride[0],
                                 has_bias_a=bias is not None, has_bias_b=False)

    def _kernel(self, importer, spec):
        """The kernel's GlobalVar for ``spec`` (added to the module on first use) and its record."""
        if spec in self.by_spec:
            return self.by_spec[spec]
        from ..kernels import schedule_branch_product, tune_branch_product

        record = KernelRecord("", spec.kind, spec.name())
        kept = self._kept_record(spec)
        if kept is not None:  # tuned before, here or (records kept with qlfx) on a machine like this
            func = kept.primfunc if spec.batch is not None else schedule_branch_product(spec, self.target, kept.knobs)[0]
            record.best_us, record.from_database = kept.best_seconds * 1e6, True
            record.note = f"record from {kept.database_path}"
            if self.progress:
                _say(f"[qlfx.tvm] kernel {spec.name()}: from {kept.database_path}, best "
                     f"{kept.best_gflops:.1f} GFLOP/s")
        elif self.trials > 0 and (self.target.kind.name == "llvm" or self.rpc is not None):
            # A symbolic batch is tuned at the example's batch size: the knobs do not depend on it.
            static = spec if spec.batch is not None else spec.with_batch(self.tuning_batch)
            from ..kernels.rpc import TrialProgress

            report = TrialProgress(f"[qlfx.tvm] kernel {static.name()}") if self.progress else None
            tuned = tune_branch_product(static, self.target, self.trials, str(self.database_dir / "branch-product"),
                                        report, **(self.rpc.builder_runner() if self.rpc is not None else {}))
            func = tuned.primfunc if static is spec else schedule_branch_product(spec, self.target, tuned.knobs)[0]
            record.trials_run, record.best_us = tuned.trials_run, tuned.best_seconds * 1e6
            record.from_database = tuned.trials_run == 0
        else:
            func, _ = schedule_branch_product(spec, self.target)
            record.note = "hand schedule" + (" (tuning a cuda kernel needs a GPU to measure on)"
                                             if self.trials > 0 else "")
        # Own symbol (the kernel names itself "main", which is the Relax entry here); already scheduled,
        # so the tuner and dlight leave it alone; opaque, so FuseOps does not merge it with neighbours.
        func = func.with_attr("global_symbol", spec.name()).with_attr("tirx.is_scheduled", True)
        func = func.with_attr("op_pattern", 8)
        self.by_spec[spec] = (importer.block_builder.add_func(func, spec.name()), record)
        return self.by_spec[spec]

    def _kept_record(self, spec):
        """A tuned record for ``spec`` (at the tuning batch when symbolic) on this target: the user's
        database first, then the records kept with qlfx; None when neither has one."""
        if self.target.kind.name != "llvm":
            return None
        from ..kernels.module_tuning import packaged_folder
        from ..kernels.tuning import lookup_branch_product

        static = spec if spec.batch is not None else spec.with_batch(self.tuning_batch)
        paths = [str(self.database_dir / "branch-product"), str(packaged_folder(self.target) / "branch-product")]
        return lookup_branch_product(static, self.target, paths)


def _stored_tensors(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> tensor for the program's parameters, buffers and constants."""
    found = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            value = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            found[spec.arg.name] = value.detach()
    return found


# ----------------------------------------------------------------------------------------- IR -> Relax
def unsupported_sites(gm: fx.GraphModule, ep: torch.export.ExportedProgram, convert_map: dict) -> list[str]:
    """One line per qlfx node whose ops (after the core ATen decompositions) TVM's importer has no
    converter for; ``ep`` is the decomposed program."""
    missing = [node for node in ep.graph.nodes
               if node.op == "call_function" and node.target.__name__ not in convert_map]
    return emit.unsupported_sites(gm, missing, "no TVM converter for")


def _meta(value) -> dict:
    """Shape (None for a symbolic size) and dtype of a FakeTensor, for TVMModule / the export's JSON."""
    return {"shape": [d if isinstance(d, int) else None for d in value.shape],
            "dtype": str(value.dtype).replace("torch.", "")}


def to_relax(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], lowering_options: dict | None = None):
    """The Relax IRModule of ``gm`` and its lowering (KernelRecords; ``lowering_options``: the keyword
    arguments of ``_Lowering``, default: llvm, hand-scheduled kernels), plus the call interface."""
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    if not isinstance(gm, fx.GraphModule):
        raise UsageError(f"build_tvm takes a torch.fx GraphModule (Compiled.graph_module), got {type(gm).__name__}")
    example_inputs = capture.check_example_inputs(example_inputs)
    ep = capture.to_exported_program(gm, example_inputs).run_decompositions(_core_aten_keeping_qlfx_ops())
    _fold_alpha(ep.graph_module)
    options = {"trials": 0, "database_dir": _default_database(), "progress": False, "use_kernels": True,
               "tuning_batch": int(example_inputs[0].shape[0]), **(lowering_options or {})}
    options["target"] = options.get("target") or make_target("llvm")
    lowering = _Lowering(gm, ep, **options)
    convert_map = lowering.convert_map()
    sites = unsupported_sites(gm, ep, {**ExportedProgramImporter().convert_map, **convert_map})
    if sites:
        raise UnsupportedOpsError(
            "TVM emitter", sites,
            "Nothing was built. Express these parts of the model with ops TVM's PyTorch frontend converts, "
            "run passes that remove them, or use the ONNX emitter (qlfx.emit.onnx).")
    outputs = [n.meta["val"] for n in ep.graph.output_node().args[0]][-len(ep.graph_signature.user_outputs):]
    single = ep.call_spec.out_spec.is_leaf()
    try:
        mod = from_exported_program(ep, custom_convert_map=convert_map, run_ep_decomposition=False,
                                    unwrap_unit_return_tuple=single)
    except Exception as err:  # noqa: BLE001 -- every op has a converter: TVM's importer itself failed
        raise QlfxError(f"TVM's from_exported_program failed on a graph whose ops it converts: "
                        f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    user_inputs = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]
    interface = {"inputs": [{"name": n.name, **_meta(n.meta["val"])} for n in user_inputs],
                 "outputs": [_meta(v) for v in outputs], "multi_output": not single}
    return mod, lowering, interface


def _default_database() -> Path:
    return Path.home() / ".cache" / "qlfx" / "tvm-tuning"


# ---------------------------------------------------------------------------- other-op tuning
def tune_module_tasks(mod, target, trials_per_task: int, database_dir: Path, progress: bool,
                      builder_runner: dict | None = None):
    """MetaSchedule-tune every unscheduled TIR task of ``mod`` that neither the database in
    ``database_dir`` nor the records kept with qlfx (qlfx/tuning_records/<target key>) hold, for this
    very target. Each task's designed default schedule is measured first and recorded as the one to
    beat; trials go to tasks by FLOPs. Returns a ``qlfx.kernels.module_tuning.ModuleTuning`` (per-task
    rows in ``.rows``). See :mod:`qlfx.kernels.module_tuning`."""
    from ..kernels import module_tuning

    summary = module_tuning.tune_tasks(mod, target, trials_per_task, Path(database_dir), is_scheduled=_is_scheduled_task,
                                       say=_say if progress else None, **(builder_runner or _builder_runner()))
    if progress and summary.tasks_tuned:
        _say(f"[qlfx.tvm] other ops: tuned {summary.tasks_tuned} tasks, {summary.trials_run} trials, in "
             f"{summary.seconds:.0f}s (logs in {Path(database_dir) / 'logs'})")
    return summary


def _applied_database(database_dir: Path, target):
    """What the build applies: the user's records over the packaged ones, for this target only."""
    from ..kernels.module_tuning import layered_database

    return layered_database(Path(database_dir), target)


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


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- the module
class TVMModule:
    """A compiled graph. ``module(*inputs)``: numpy in -> numpy out, torch in -> torch out (CPU tensors);
    a single graph output is returned bare, several as a tuple. ``inputs``/``outputs`` shapes hold None
    for a symbolic size (any batch size, for a graph captured with ``dynamic_batch``).

    Attributes: ``target`` (tvm Target), ``executable`` (relax VM executable), ``kernels`` (a
    KernelRecord per fused site), ``tuning`` (ModuleTuning of the other ops, with a row per task, or None), ``notes``,
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

    def run(self, *inputs) -> list:
        """Always a list, one entry per graph output, as onnxruntime's ``session.run`` and the loaded
        module's ``run`` return (``__call__`` returns a single output bare, as the torch model does)."""
        outs = self(*inputs)
        return list(outs) if self.multi_output else [outs]

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
        """Write ``path`` (.so, or .tar: tvm's tarball of objects, linked when loaded) and its metadata
        ``.json``, each atomically. Returns the library's path."""
        so = tvm_runtime.library_path(path)
        with atomic_output(so) as tmp, tvm_runtime.native_log_filter():
            self.executable.export_library(str(tmp))
        atomic_write(tvm_runtime.metadata_path(so), json.dumps(self.metadata(), indent=2))
        return so

    def __repr__(self) -> str:
        return (f"TVMModule(target={self.target.kind.name}, fused_kernels={len(self.kernels)}, "
                f"inputs={[tuple(i['shape']) for i in self.inputs]})")


# ----------------------------------------------------------------------------------------- build
def _core_aten_keeping_qlfx_ops() -> dict:
    """The core ATen decomposition table without qlfx's ops (which have converters here)."""
    table = torch.export.default_decompositions()
    for name in ("branch_product", "hardball", "softball"):
        table.pop(getattr(torch.ops.qlfx, name).default, None)
    return table


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
    rpc: Any = None,
) -> TVMModule:
    """Compile the qlfx graph ``gm`` for ``target`` ("llvm", "cuda", a dict or a tvm Target).

    ``tune_trials``: MetaSchedule trials per fused-kernel shape (0: the hand schedule).
    ``tuning_db``: folder of the persistent JSON tuning database (default ~/.cache/qlfx/tvm-tuning);
    shapes it already holds are not tuned again. ``tune_other_ops``: also tune the remaining TIR tasks
    (``other_ops_trials`` per task, default ``tune_trials``) with the same database (static shapes
    only: skipped, with a note, for a graph with a symbolic batch). ``use_kernels=False``: no qlfx
    kernels, branch products as Relax ops. ``rpc``: a :class:`qlfx.kernels.rpc.RPCSettings`, to measure
    every tuning trial on the servers of a TVM RPC tracker (candidates are built here).
    """
    import tvm
    from tvm import relax

    start = time.perf_counter()
    tgt = make_target(target)
    database_dir = Path(tuning_db) if tuning_db is not None else _default_database()
    mod, lowering, interface = to_relax(gm, example_inputs, dict(
        target=tgt, trials=tune_trials, database_dir=database_dir, progress=progress, use_kernels=use_kernels,
        rpc=rpc))
    relax_module = mod
    notes = []
    is_gpu = tgt.kind.name == "cuda"
    pipeline = _backend_pipeline(tgt)
    with tgt:
        # Relax's default pipeline for the target (relax.get_default_pipeline), split open so that the
        # tuning database is applied after fusion and before cuda's default (dlight) schedules.
        # (dead code first: the lowering leaves the bindings it made redundant, e.g. a repeated copy)
        mod = tvm.transform.Sequential([relax.transform.DeadCodeElimination()] + pipeline.library_dispatch_passes(tgt)
                                       + _legalize_passes_without_dlight())(mod)
    tuning = None
    other_trials = tune_trials if other_ops_trials is None else other_ops_trials
    dynamic = any(None in i["shape"] for i in interface["inputs"])
    if tune_other_ops and dynamic:
        notes.append("tune_other_ops skipped: MetaSchedule tunes static shapes, this graph has a symbolic batch")
    elif tune_other_ops and other_trials > 0:
        tuning = tune_module_tasks(mod, tgt, other_trials, database_dir / "other-ops", progress,
                                   rpc.builder_runner() if rpc is not None else None)
    if not dynamic and (tgt.kind.name == "llvm" or tune_other_ops):
        # records of earlier tuning (and the ones kept with qlfx) replace the default schedules even
        # when this build tunes nothing: a machine like the one that tuned gets the tuned module
        with tgt, _applied_database(database_dir / "other-ops", tgt):
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    with tgt:
        if is_gpu:
            from tvm.s_tir import dlight as dl

            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        else:
            # every task the database has no record for gets qlfx's designed CPU schedule (TVM 0.27 has
            # no x86 schedules of its own: unscheduled, qlnet50 took 1.4 s per image)
            from ..kernels.cpu_schedules import apply_default_schedules

            mod = apply_default_schedules(mod, tgt)
        mod = tvm.transform.Sequential(pipeline.dataflow_lower_passes(tgt) + pipeline.finalize_passes(tgt))(mod)
    with tvm_runtime.native_log_filter():
        executable = tvm.compile(mod, target=tgt, relax_pipeline=None)
    return TVMModule(executable, tgt, interface["inputs"], interface["outputs"], interface["multi_output"],
                     lowering.records, tuning, notes, relax_module, time.perf_counter() - start)


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
