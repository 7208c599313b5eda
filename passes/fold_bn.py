"""fold-bn: fold every eval-mode batchnorm into a neighbouring linear op.

An eval-mode BN is the per-channel affine map ``BN(x) = s * x + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. Three rewrites, tried in this order:

1. **Into the op before it** (conv of any kernel/groups, or linear):
   ``BN(W x + b) = (s W) x + (s b + t)`` — scale the output rows of W.
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

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from qlfx import ir
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass


@dataclass
class BatchNormCall:
    node: fx.Node
    input: fx.Node
    running_mean: fx.Node | None
    running_var: fx.Node | None
    weight: fx.Node | None
    bias: fx.Node | None
    training: bool
    eps: float

    _ORDER = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")

    @classmethod
    def of(cls, node: fx.Node) -> "BatchNormCall | None":
        if node.op != "call_function" or node.target is not F.batch_norm:
            return None
        v = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
        v.update(zip(cls._ORDER, node.args))
        v.update(node.kwargs)
        return cls(node, v["input"], v["running_mean"], v["running_var"], v["weight"], v["bias"],
                   bool(v["training"]), float(v["eps"]))

    def scale_shift(self, gm: fx.GraphModule) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t) in float64 so the folded weights round once, at the end."""
        mean = ir.get_tensor(gm, self.running_mean).double()
        var = ir.get_tensor(gm, self.running_var).double()
        gamma = ir.get_tensor(gm, self.weight).double() if self.weight is not None else torch.ones_like(var)
        beta = ir.get_tensor(gm, self.bias).double() if self.bias is not None else torch.zeros_like(var)
        s = gamma / torch.sqrt(var + self.eps)
        return s, beta - mean * s


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


def _linear_view(node: fx.Node):
    """(weight, bias, set_args) for a conv or linear node, or None."""
    conv = ir.ConvCall.of(node)
    if conv is not None:
        return conv.weight, conv.bias, lambda w, b: conv.set_args(weight=w, bias=b)
    if node.op == "call_function" and node.target is F.linear:
        args = list(node.args) + [None] * (3 - len(node.args))
        w, b = node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])

        def set_args(w2, b2):
            node.args, node.kwargs = (args[0], w2, b2), {}

        return w, b, set_args
    return None


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
            if bn.running_mean is None or bn.running_var is None or not _is_const(bn.running_mean):
                result.skipped.append(Skip(node.name, "batchnorm without stored running statistics"))
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
        producer = bn.input
        view = _linear_view(producer)
        if view is None:
            return f"before it: {producer.name} is not a conv or linear"
        w_node, b_node, set_args = view
        if len(producer.users) != 1:
            return f"before it: the output of {producer.name} is also used without the batchnorm"
        for what, arg in (("weight", w_node), ("bias", b_node)):
            problem = _private_constant_problem(gm, producer, what, arg)
            if problem:
                return f"before it: {producer.name}: {problem}"
        if not ctx.allow_rewrite():
            return "rewrite limit reached (bisection)"
        s, t = bn.scale_shift(gm)
        w = ir.get_tensor(gm, w_node)
        b = ir.get_tensor(gm, b_node).double() if b_node is not None else torch.zeros_like(s)
        shape = (-1,) + (1,) * (w.dim() - 1)
        with gm.graph.inserting_before(producer):
            new_w = ir.constant_node(gm, (w.double() * s.view(shape)).to(w.dtype), f"{producer.name}_weight_bn")
            new_b = ir.constant_node(gm, (b * s + t).to(w.dtype), f"{producer.name}_bias_bn")
        set_args(new_w, new_b)
        self._finish(gm, bn, producer, result, f"{bn.node.name} into {producer.name}")
        return None

    # -- rule 2 ----------------------------------------------------------------------------------
    def _through_product(self, gm, bn: BatchNormCall, ctx, result) -> str | None:
        users = list(bn.node.users)
        if len(users) != 1 or not ir.is_mul(users[0]) or len(users[0].args) != 2:
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
                replacement = gm.graph.call_function(torch.add, (h, c))
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
                    plus = gm.graph.call_function(torch.add, (c, m))
                ir.replace_value(c, plus)
                plus.args = (c, m)  # replace_value also rewired plus's own input
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
