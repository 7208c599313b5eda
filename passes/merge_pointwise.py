"""merge-pointwise: multiply a conv and the 1x1 conv that alone reads it into one conv, where that
needs fewer MACs.

With conv1 (weight W: r x C_in x k x k, bias c, one group) and conv2 pointwise (U: C_out x r, bias b;
1x1, stride 1, no padding, one group) reading only conv1's output:

    conv2(conv1(x)) = U (W * x + c) + b = (U W) * x + (U c + b),   (U W)[o] = sum_m U[o, m] W[m]

so one conv with conv1's stride, padding and dilation computes it (equal up to rounding). MACs per
output pixel: r (C_in k^2 + C_out) before, C_out C_in k^2 after; merged only when that is not more.
It undoes `factor` where `slice` did not shrink the inner space below the break-even width, and
removes linear bottlenecks (two convs with nothing between them) that cost more than they save.

Needs ``bn-folded`` (a BN between the two convs hides the pair) and ``constants-folded`` (a weight
computed in the graph is not a stored matrix to multiply); a pair either blocks is skipped saying so.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from qlfx import ir
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass
from qlfx.requirements import BN_FOLDED, CONSTANTS_FOLDED


@register_pass
class MergePointwise(Pass):
    name = "merge-pointwise"
    description = "compose a conv with the 1x1 conv that alone reads it, where the merged conv needs fewer MACs"
    contract = "equivalent"
    requires = (BN_FOLDED, CONSTANTS_FOLDED)
    site_noun = "conv pair"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        for node in list(gm.graph.nodes):
            second = ir.ConvCall.of(node)
            if second is None or not second.is_pointwise or second.stride != (1, 1):
                continue
            bn = ir.BatchNormCall.of(second.input) if isinstance(second.input, fx.Node) else None
            hidden = ir.ConvCall.of(bn.input) if bn is not None and isinstance(bn.input, fx.Node) else None
            if hidden is not None and hidden.groups == 1:
                result.skipped.append(Skip(node.name, f"the batchnorm {bn.node.name} sits between it and "
                                                      f"{bn.input.name}", needs=BN_FOLDED))
                continue
            first = ir.ConvCall.of(second.input) if isinstance(second.input, fx.Node) else None
            if first is None or first.groups != 1:
                continue
            if not (ir.is_constant(first.weight) and ir.is_constant(second.weight)):
                result.skipped.append(Skip(node.name, "a weight is computed in the graph",
                                           needs=CONSTANTS_FOLDED))
                continue
            if len(first.node.users) != 1:
                result.skipped.append(Skip(node.name, f"{first.node.name}'s output has other users"))
                continue
            if any(b is not None and not ir.is_constant(b) for b in (first.bias, second.bias)):
                continue
            w = ir.get_tensor(gm, first.weight).detach()
            u = ir.get_tensor(gm, second.weight).detach().flatten(1)  # C_out x r
            r, fan_in, c_out = w.shape[0], math.prod(w.shape[1:]), u.shape[0]
            if c_out * fan_in > r * (fan_in + c_out):
                result.skipped.append(Skip(node.name, f"factored form is cheaper ({r} inner channels < "
                                                      f"{c_out * fan_in / (fan_in + c_out):.1f})"))
                continue
            if not ctx.allow_rewrite():
                break
            merged = (u.double() @ w.double().flatten(1)).reshape(c_out, *w.shape[1:]).to(w.dtype)
            bias = torch.zeros(c_out, dtype=torch.float64)
            if first.bias is not None:
                bias += u.double() @ ir.get_tensor(gm, first.bias).detach().double()
            if second.bias is not None:
                bias += ir.get_tensor(gm, second.bias).detach().double()
            with gm.graph.inserting_before(first.node):
                wn = ir.constant_node(gm, merged, f"{first.node.name}_merged_weight")
                bn = ir.constant_node(gm, bias.to(w.dtype), f"{first.node.name}_merged_bias")
            first.set_args(weight=wn, bias=bn)
            ir.replace_value(node, first.node)  # first now computes the pair's value
            gm.graph.erase_node(node)
            result.rewrites.append(f"{first.node.name} + {node.name}: {r} inner channels -> one conv "
                                   f"{tuple(merged.shape)}")
            result.changed = True
        if result.changed:
            for n in list(gm.graph.nodes):
                if n.op == "get_attr" and not n.users:
                    gm.graph.erase_node(n)
        return result
