"""fuse-product: replace the product of two linear branches of one input by one fused op.

Pattern (after fold-bn and constant-fold, so BN is gone and every weight is a stored constant)::

    a = conv_a(u)      1x1, groups 1, padding 0           (or rows R_a of a conv's output)
    b = conv_b(u)      1x1 (pointwise) or depthwise kxk   (or rows R_b of a conv's output)
    p = a * b          same shape, no broadcasting

becomes ``p = torch.ops.qlfx.branch_product(u, W_a, c_a, W_b, c_b, stride, padding_b, dilation_b,
groups_b)`` (see :mod:`qlfx.ops`), which computes exactly ``conv(u; W_a, c_a) * conv(u; W_b, c_b)``.
Equivalent, not bit-exact: the fused kernels may sum in another order.

The layouts it finds:

- authors' PDEBlock: ``z = conv1x1(u)`` with 2M outputs, ``z[:, :M] * z[:, M:]``. Slicing the output
  rows of a conv is slicing the rows of its weight and bias: ``conv(u; W, c)[:, R] = conv(u; W[R], c[R])``,
  so ``W_a = W[R_a], W_b = W[R_b]`` for any two channel slices R_a, R_b of equal width (halves, or any
  other pair; steps allowed) of a groups-1 conv;
- paper Eq.(3): ``conv1x1_a(u) * dw3x3(u)`` (the dw weight is a constant [kC, 1, 3, 3] with groups C after
  constant-fold) -> the depthwise kind, with the conv strides equal;
- any other such product, e.g. GLU-style gating ``conv_a(u) * conv_b(u)`` of two 1x1 convs.

Left alone, each with its reason in ``PassResult.skipped``: a factor that is not a conv (squeeze-excitation
``x * sigmoid(fc(pool(x)))``, a BN, an activation), factors computed from different inputs, weights
computed in the graph instead of stored (e.g. the shared kernel ``w.repeat(C, 1, 1, 1)`` before
constant-fold), a conv output (or slice) that is also used elsewhere (fusing would compute it twice),
strides that differ, a b-branch that is neither pointwise nor depthwise (no qlfx kernel), broadcasting.

Fusing the FOLLOWING depthwise 3x3 too (PDEBlock: product -> conv2, W -> 2W, groups W, + folded BN)
------------------------------------------------------------------------------------------------------
Measured, and not done. torch 2.13 CPU, 2 threads, batch 1, qlnet50 stage shapes (first-stage-block
shapes; milliseconds, median of 30 runs, measured by benchmarks in this docstring's history: the numbers
below come from ``python -m qlfx.passes.fuse_product`` which reruns the measurement):

    stage  u (C,HxW)   W     conv1x1+mul (2M rows)   dw3x3 W->2W   reference total   banded fused
    1      64, 56x56   256        MEAS_S1_A              MEAS_S1_D        MEAS_S1_T         MEAS_S1_F
    2      128, 28x28  512        MEAS_S2_A              MEAS_S2_D        MEAS_S2_T         MEAS_S2_F
    3      256, 14x14  512        MEAS_S3_A              MEAS_S3_D        MEAS_S3_T         MEAS_S3_F
    4      512, 7x7    1024       MEAS_S4_A              MEAS_S4_D        MEAS_S4_T         MEAS_S4_F

"banded fused" is the only fused formulation expressible without a new kernel: compute
conv1x1 -> product -> dw3x3 per band of output rows (with a one-row halo recomputed), so the product
tile stays in cache. DECISION_TEXT
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

import qlfx.ops  # noqa: F401  (registers torch.ops.qlfx.branch_product)
from qlfx import ir
from qlfx.ops import branch_product_kind
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass

BRANCH_PRODUCT = torch.ops.qlfx.branch_product.default


class _NoMatch(Exception):
    """Why a product is not fused (the message goes into PassResult.skipped)."""


@dataclass
class Factor:
    """One factor of the product, seen as (rows of) a conv's output."""

    node: fx.Node  # the mul's argument: the conv itself or a getitem on it
    conv: ir.ConvCall
    rows: list[int] | None  # output channels of the conv this factor reads; None = all

    def weight_bias(self, gm: fx.GraphModule) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = ir.get_tensor(gm, self.conv.weight)
        b = ir.get_tensor(gm, self.conv.bias) if self.conv.bias is not None else None
        if self.rows is None:
            return w, b
        index = torch.tensor(self.rows, dtype=torch.long)
        return w[index], (b[index] if b is not None else None)

    @property
    def is_pointwise(self) -> bool:
        kernel = tuple(self.conv.weight.meta["tensor_meta"].shape[2:]) if "tensor_meta" in self.conv.weight.meta else None
        return kernel == (1, 1) and self.conv.groups == 1 and self.conv.padding in ((0, 0), "valid")


def _channel_rows(index, channels: int) -> list[int] | None:
    """The channel rows selected by ``x[index]`` when it slices dim 1 only, else None."""
    if not isinstance(index, tuple) or len(index) < 2:
        return None
    full = slice(None, None, None)
    if index[0] != full or not isinstance(index[1], slice):
        return None
    if any(i != full and i is not Ellipsis for i in index[2:]):
        return None
    step = index[1].step if index[1].step is not None else 1
    if not isinstance(step, int) or step <= 0:
        return None
    return list(range(channels))[index[1]]


def _describe(node) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({node.op} {target})"


def _factor(node: fx.Node) -> Factor:
    conv = ir.ConvCall.of(node)
    if conv is not None:
        return Factor(node, conv, None)
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        source = ir.ConvCall.of(node.args[0])
        shape = ir.shape(node.args[0])
        if source is not None and shape is not None:
            rows = _channel_rows(node.args[1], shape[1])
            if rows is None:
                raise _NoMatch(f"factor {node.name} indexes {node.args[0].name} other than by a channel slice")
            if source.groups != 1:
                raise _NoMatch(f"factor {node.name} slices the grouped conv {node.args[0].name} "
                               f"(groups={source.groups}); its rows are not a conv of their own")
            return Factor(node, source, rows)
    raise _NoMatch(f"factor {_describe(node)} is not a conv (or a channel slice of one)")


def _stored(node, what: str, conv_name: str) -> None:
    if node is not None and not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise _NoMatch(
            f"the {what} of {conv_name} is computed in the graph ({_describe(node)}), not a stored constant; "
            f"run constant-fold before fuse-product"
        )


def _symmetric_padding(conv: ir.ConvCall, kernel: tuple[int, int]) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [conv.dilation[i] * (kernel[i] - 1) for i in range(2)]
        if any(t % 2 for t in totals):
            raise _NoMatch(f"{conv.node.name} pads 'same' asymmetrically; branch_product pads symmetrically")
        return (totals[0] // 2, totals[1] // 2)
    return tuple(int(p) for p in conv.padding)


@register_pass
class FuseProduct(Pass):
    name = "fuse-product"
    description = "fuse a product of two linear branches of one input (conv1x1 * conv1x1|dwconv) into qlfx::branch_product"
    contract = "equivalent"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False, stats={"pointwise": 0, "depthwise": 0})
        for node in list(gm.graph.nodes):
            if not ir.is_mul(node) or len(node.args) != 2 or node.kwargs:
                continue
            if not all(isinstance(a, fx.Node) for a in node.args):
                continue  # a scaling by a Python number: not a product of branches
            try:
                a, b = self._match(gm, node)
            except _NoMatch as why:
                result.skipped.append(Skip(node.name, str(why)))
                continue
            if not ctx.allow_rewrite():
                result.skipped.append(Skip(node.name, "rewrite limit reached (bisection)"))
                continue
            kind = self._rewrite(gm, node, a, b)
            result.changed = True
            result.stats[kind] += 1
            result.rewrites.append(f"{node.name} = {a.node.name} * {b.node.name} ({kind})")
        return result

    # -------------------------------------------------------------------------------------- match
    def _match(self, gm: fx.GraphModule, mul: fx.Node) -> tuple[Factor, Factor]:
        a, b = (_factor(arg) for arg in mul.args)
        if a.conv.input is not b.conv.input:
            raise _NoMatch(f"the factors read different inputs ({_describe(a.conv.input)} and "
                           f"{_describe(b.conv.input)})")
        shapes = {ir.shape(mul), ir.shape(a.node), ir.shape(b.node)}
        if len(shapes) != 1 or None in shapes:
            raise _NoMatch(f"the factors' shapes differ or broadcast: {ir.shape(a.node)} * {ir.shape(b.node)}")
        for f in (a, b):
            _stored(f.conv.weight, "weight", f.conv.node.name)
            _stored(f.conv.bias, "bias", f.conv.node.name)
        factor_nodes = {a.node, b.node}
        for f in (a, b):
            if set(f.node.users) != {mul}:
                others = [u.name for u in f.node.users if u is not mul]
                raise _NoMatch(f"{f.node.name} is also used by {', '.join(others)}; fusing would compute it twice")
            outside = [u.name for u in f.conv.node.users if u not in factor_nodes]
            if f.rows is not None and outside:
                raise _NoMatch(f"the output of {f.conv.node.name} is also used by {', '.join(outside)}")
        if not a.is_pointwise:
            a, b = b, a
        if not a.is_pointwise:
            raise _NoMatch("neither factor is a 1x1 conv with groups 1 and no padding (branch_product's a-branch)")
        if a.conv.stride != b.conv.stride:
            raise _NoMatch(f"the branches' strides differ: {a.conv.stride} vs {b.conv.stride}")
        if a.conv.weight.meta["tensor_meta"].dtype != b.conv.weight.meta["tensor_meta"].dtype:
            raise _NoMatch("the branches' weights have different dtypes")
        b_shape = tuple(b.conv.weight.meta["tensor_meta"].shape)
        if b.rows is not None:
            b_shape = (len(b.rows),) + b_shape[1:]
        in_channels = ir.shape(a.conv.input)[1]
        if branch_product_kind(b_shape, b.conv.groups, in_channels) is None:
            raise _NoMatch(f"{b.conv.node.name} (kernel {b_shape[2:]}, groups {b.conv.groups}) is neither pointwise "
                           f"nor depthwise; no branch_product kernel covers it")
        _symmetric_padding(b.conv, b_shape[2:])
        return a, b

    # ------------------------------------------------------------------------------------ rewrite
    def _rewrite(self, gm: fx.GraphModule, mul: fx.Node, a: Factor, b: Factor) -> str:
        u = a.conv.input
        with gm.graph.inserting_before(mul):
            args = []
            for f, tag in ((a, "a"), (b, "b")):
                if f.rows is None:  # the conv's own constants serve as they are
                    args += [f.conv.weight, f.conv.bias]
                    continue
                w, c = f.weight_bias(gm)
                args.append(ir.constant_node(gm, w, f"{mul.name}_weight_{tag}"))
                args.append(ir.constant_node(gm, c, f"{mul.name}_bias_{tag}") if c is not None else None)
            kernel = tuple(b.conv.weight.meta["tensor_meta"].shape[2:])
            padding_b = _symmetric_padding(b.conv, kernel)
            fused = gm.graph.call_function(
                BRANCH_PRODUCT,
                (u, args[0], args[1], args[2], args[3], list(a.conv.stride), list(padding_b),
                 list(b.conv.dilation), b.conv.groups),
            )
        kind = branch_product_kind(tuple(b.weight_bias(gm)[0].shape), b.conv.groups, ir.shape(u)[1])
        fused.meta["qlfx_branch_product_kind"] = kind
        fused.meta["qlfx_fused_from"] = [mul.name, a.node.name, b.node.name]
        ir.replace_value(mul, fused)
        # Remove the old product, its slices, the convs and the weight reads nobody uses any more.
        dead = [mul, a.node, b.node, a.conv.node, b.conv.node]
        reads = [a.conv.weight, a.conv.bias, b.conv.weight, b.conv.bias]
        for n in dict.fromkeys(dead):
            if n in gm.graph.nodes and not n.users:
                gm.graph.erase_node(n)
        for n in dict.fromkeys(r for r in reads if r is not None):
            if not n.users:
                gm.graph.erase_node(n)
        return kind
