"""fold-bn: fold every eval-mode batchnorm into a neighbouring linear op.

An eval-mode BN is the per-channel affine map ``BN(x) = s * x + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. Three rewrites, tried in this order:

1. **Into the op before it** (conv of any kernel/groups, or linear):
   ``BN(W x + b) = (s W) x + (s b + t)`` — scale the output rows of W. Also into the ops before a
   concatenation along channels: BN acts per channel, so ``BN(cat(z_1, .., z_k))`` is
   ``cat(BN_1(z_1), .., BN_k(z_k))`` with ``BN_i`` the channels of piece i (MixNet's mixed kernels).
2. **Through a branch product** (DESIGN.md §4), when the BN's only user is ``a * BN(h)`` and ``a`` is a
   conv of its own: ``a * (s h + t) = (s a) * (h + t / s)``. The scale moves into a's weights and bias;
   ``t / s`` becomes a bias of h's producer (or an added constant). Exact in real arithmetic when no
   ``s`` is zero (else the rewrite is skipped); used when rule 1 cannot apply, e.g. the paper's shared
   3x3 kernel ``w.repeat(C, 1, 1, 1)``, which this rule keeps shared.
3. **Into the convs after it**, when nothing linear precedes it:
   ``W (s x + t) = (W diag(s)) x + W t``. With zero padding the shift is not a constant bias: padded
   pixels of ``BN(x)`` are 0, not t. So for padded convs ``W t`` is computed as a bias *map*,
   ``conv(t broadcast over the input size, zero-padded)``, exact for the traced input size.

Refused (skipped, with the reason in the report): BN in training mode; a weight or bias that another
call site also reads (a conv module used twice); a conv whose output has other users besides the BN.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from qlfx import ir
from qlfx.ir import BatchNormCall
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass

ADD = torch.ops.aten.add.Tensor


def _is_const(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr"


def _private_constant_problem(gm: fx.GraphModule, node: fx.Node, what: str, arg) -> str | None:
    """Why ``arg`` (a weight/bias argument of ``node``) cannot be replaced for ``node`` alone, or None."""
    if arg is None:
        return None
    if not _is_const(arg):
        return f"its {what} is computed in the graph ({arg.name}), not a stored constant"
    readers = [u for u in ir.attr_users(gm, arg.target)]
    if any(u is not node for u in readers):
        return (f"its {what} '{arg.target}' is also read by {len(readers) - 1} other call site(s); "
                f"folding would change them too")
    return None


def _producers(x: fx.Node) -> list[tuple[fx.Node, slice]] | str:
    """The ops whose outputs the BN's input is made of, with the channels each gives: ``x`` itself, or
    the pieces of a concatenation along channels that only the BN reads (MixNet's mixed convs,
    GhostNet's ghost modules), or why not."""
    if not ir.is_op(x, ir.CAT):
        return [(x, slice(None))]
    a = ir.op_args(x)
    rank = len(ir.shape(x))
    if a["dim"] % rank != 1:
        return f"{x.name} concatenates along dim {a['dim']}, not the channels"
    if len(x.users) != 1:
        return f"the concatenation {x.name} is also used without the batchnorm"
    pieces, start = [], 0
    for piece in a["tensors"]:
        width = ir.channels(piece)
        if width is None or a["tensors"].count(piece) > 1:
            return f"{x.name} concatenates {piece.name} more than once or without a known width"
        pieces.append((piece, slice(start, start + width)))
        start += width
    return pieces


def _linear_view(node: fx.Node):
    """(weight, bias, set_args) for an aten.conv2d or aten.linear node, or None."""
    view = ir.ConvCall.of(node) or ir.LinearCall.of(node)
    if view is None:
        return None
    return view.weight, view.bias, lambda w, b: view.set_args(weight=w, bias=b)


@register_pass
class FoldBatchNorm(Pass):
    name = "fold-bn"
    description = "fold eval-mode batchnorm into the linear op before it, through a branch product, or into the convs after it"
    contract = "equivalent"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        for node in list(gm.graph.nodes):
            bn = BatchNormCall.of(node)
            if bn is None:
                continue
            if bn.training:
                result.skipped.append(Skip(node.name, "batchnorm in training mode (uses batch statistics)"))
                continue
            if not bn.foldable:
                result.skipped.append(Skip(node.name, "batchnorm without stored running statistics or affine "
                                                      "parameters (computed in the graph)"))
                continue
            reasons = []
            for rule in (self._into_producer, self._through_product, self._into_consumers):
                why = rule(gm, bn, ctx, result)
                if why is None:
                    break
                reasons.append(why)
            else:
                result.skipped.append(Skip(node.name, "; ".join(reasons)))
        return result

    # -- rule 1 ----------------------------------------------------------------------------------
    def _into_producer(self, gm, bn: BatchNormCall, ctx, result) -> str | None:
        pieces = _producers(bn.input)
        if isinstance(pieces, str):
            return f"before it: {pieces}"
        views = []
        for producer, _ in pieces:
            view = _linear_view(producer)
            if view is None:
                return f"before it: {producer.name} is not a conv or linear"
            if len(producer.users) != 1:
                return f"before it: the output of {producer.name} is also used without the batchnorm"
            for what, arg in (("weight", view[0]), ("bias", view[1])):
                problem = _private_constant_problem(gm, producer, what, arg)
                if problem:
                    return f"before it: {producer.name}: {problem}"
            views.append(view)
        if not ctx.allow_rewrite():
            return "rewrite limit reached (bisection)"
        s_all, t_all = bn.scale_shift(gm)
        for (producer, rows), (w_node, b_node, set_args) in zip(pieces, views):
            s, t = s_all[rows], t_all[rows]
            w = ir.get_tensor(gm, w_node)
            b = ir.get_tensor(gm, b_node).double() if b_node is not None else torch.zeros_like(s)
            shape = (-1,) + (1,) * (w.dim() - 1)
            with gm.graph.inserting_before(producer):
                new_w = ir.constant_node(gm, (w.double() * s.view(shape)).to(w.dtype), f"{producer.name}_weight_bn")
                new_b = ir.constant_node(gm, (b * s + t).to(w.dtype), f"{producer.name}_bias_bn")
            set_args(new_w, new_b)
            if len(pieces) > 1:  # each piece now carries a value no earlier graph has
                producer.meta[ir.VALUE_OF] = f"{producer.name}:{bn.node.name}"
        ir.replace_value(bn.node, bn.input)  # the producer (or the concatenation) now carries BN's value
        gm.graph.erase_node(bn.node)
        result.changed = True
        result.rewrites.append(f"{bn.node.name} into {', '.join(p.name for p, _ in pieces)}")
        return None

    # -- rule 2 ----------------------------------------------------------------------------------
    def _through_product(self, gm, bn: BatchNormCall, ctx, result) -> str | None:
        users = list(bn.node.users)
        if len(users) != 1 or not ir.is_op(users[0], torch.ops.aten.mul.Tensor):
            return "through a product: its output does not feed exactly one product"
        mul = users[0]
        other = mul.args[1] if mul.args[0] is bn.node else mul.args[0]
        conv = ir.ConvCall.of(other) if isinstance(other, fx.Node) else None
        if conv is None:
            return "through a product: the other factor is not a conv"
        if len(other.users) != 1:
            return f"through a product: {other.name} has other users"
        if ir.shape(other) != ir.shape(bn.node):
            return "through a product: the factors' shapes differ (broadcasting)"
        for what, arg in (("weight", conv.weight), ("bias", conv.bias)):
            problem = _private_constant_problem(gm, other, what, arg)
            if problem:
                return f"through a product: {other.name}: {problem}"
        s, t = bn.scale_shift(gm)
        if bool((s == 0).any()) or not bool(torch.isfinite(t / s).all()):
            return "through a product: a batchnorm scale is zero"
        if not ctx.allow_rewrite():
            return "rewrite limit reached (bisection)"
        w = ir.get_tensor(gm, conv.weight)
        b = ir.get_tensor(gm, conv.bias).double() if conv.bias is not None else torch.zeros_like(s)
        with gm.graph.inserting_before(other):
            new_w = ir.constant_node(gm, (w.double() * s.view(-1, 1, 1, 1)).to(w.dtype), f"{other.name}_weight_bn")
            new_b = ir.constant_node(gm, (b * s).to(w.dtype), f"{other.name}_bias_bn")
        conv.set_args(weight=new_w, bias=new_b)
        shift = t / s
        h = bn.input
        h_conv = ir.ConvCall.of(h)
        if (h_conv is not None and len(h.users) == 1
                and _private_constant_problem(gm, h, "bias", h_conv.bias) is None):
            old = ir.get_tensor(gm, h_conv.bias).double() if h_conv.bias is not None else torch.zeros_like(s)
            with gm.graph.inserting_before(h):
                h_conv.set_args(bias=ir.constant_node(gm, (old + shift).to(w.dtype), f"{h.name}_bias_bn"))
            replacement = h
        else:
            with gm.graph.inserting_after(h):
                c = ir.constant_node(gm, shift.to(w.dtype).view(1, -1, *([1] * (len(ir.shape(h)) - 2))),
                                     f"{bn.node.name}_shift")
            with gm.graph.inserting_after(c):
                replacement = ir.call(gm, ADD, (h, c), like=bn.node)
        self._finish(gm, bn, replacement, result, f"{bn.node.name} through product {mul.name} into {other.name}")
        return None

    # -- rule 3 ----------------------------------------------------------------------------------
    def _into_consumers(self, gm, bn: BatchNormCall, ctx, result) -> str | None:
        consumers = list(bn.node.users)
        views = []
        for c in consumers:
            view = _linear_view(c)
            if view is None or c.args[0] is not bn.node or bn.node in c.args[1:]:
                return f"after it: {c.name} is not a conv/linear reading it as input"
            for what, arg in (("weight", view[0]), ("bias", view[1])):
                problem = _private_constant_problem(gm, c, what, arg)
                if problem:
                    return f"after it: {c.name}: {problem}"
            views.append(view)
        if not consumers:
            return "after it: unused"
        if not ctx.allow_rewrite():
            return "rewrite limit reached (bisection)"
        s, t = bn.scale_shift(gm)
        for c, (w_node, b_node, set_args) in zip(consumers, views):
            w = ir.get_tensor(gm, w_node)
            b = ir.get_tensor(gm, b_node).double() if b_node is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            conv = ir.ConvCall.of(c)
            groups = conv.groups if conv is not None else 1
            cin_g = w.shape[1]
            # per-weight input-channel index: out channel o in group g reads inputs g*cin_g .. g*cin_g+cin_g-1
            group_of_out = torch.arange(w.shape[0]) // (w.shape[0] // groups)
            in_index = group_of_out[:, None] * cin_g + torch.arange(cin_g)[None, :]
            expand = (slice(None), slice(None)) + (None,) * (w.dim() - 2)
            new_w = w.double() * s[in_index][expand]
            padded = conv is not None and conv.padding not in ((0, 0), "valid")
            add_map = None
            if not padded:
                new_b = b + (w.double() * t[in_index][expand]).sum(dim=tuple(range(1, w.dim())))
            else:
                in_shape = ir.shape(bn.input)
                shift_image = t.view(1, -1, 1, 1).expand(1, in_shape[1], *in_shape[2:])
                add_map = F.conv2d(shift_image, w.double(), None, conv.stride, conv.padding, conv.dilation, groups)
                new_b = b
            with gm.graph.inserting_before(c):
                set_args(ir.constant_node(gm, new_w.to(w.dtype), f"{c.name}_weight_bn"),
                         ir.constant_node(gm, new_b.to(w.dtype), f"{c.name}_bias_bn"))
            if add_map is not None:
                with gm.graph.inserting_after(c):
                    m = ir.constant_node(gm, add_map.to(w.dtype), f"{c.name}_bn_shift_map")
                with gm.graph.inserting_after(m):
                    plus = ir.call(gm, ADD, (c, m), like=c)
                ir.replace_value(c, plus)
                result.notes.append(f"{bn.node.name} -> {c.name}: zero padding, so the shift is a bias map "
                                    f"fixed to input size {tuple(in_shape[2:])}")
        self._finish(gm, bn, bn.input, result, f"{bn.node.name} into {', '.join(c.name for c in consumers)}")
        return None

    @staticmethod
    def _finish(gm, bn: BatchNormCall, replacement: fx.Node, result: PassResult, site: str) -> None:
        if replacement is bn.input:
            bn.node.replace_all_uses_with(replacement)  # the BN's value is gone, not carried
        else:
            ir.replace_value(bn.node, replacement)
        gm.graph.erase_node(bn.node)
        result.changed = True
        result.rewrites.append(site)
