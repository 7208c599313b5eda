"""expand-depthwise: a depthwise conv with a channel multiplier becomes a pure depthwise conv.

A conv with ``groups = C`` and ``m*C`` outputs (channel multiplier ``m > 1``; the PDEBlock's 3x3 conv
W -> 2W) computes output channel ``c*m + j`` from input channel ``c`` with kernel ``w[c*m + j]``.
Repeating every input channel ``m`` times, ``x_rep[:, c*m + j] = x[:, c]``
(``aten.repeat_interleave.self_int(x, m, 1)``), gives exactly the same sums from a pure depthwise conv
(``groups = m*C``, one output per input channel) with the same weights, bias, stride and padding:

    conv(x, w, groups=C)[c*m+j] = sum_{u,v} w[c*m+j, 0, u, v] x[c, .+u, .+v] = conv(x_rep, w, groups=mC)[c*m+j]

Why: runtimes have fast kernels for multiplier-1 depthwise convs only. Measured on this 2-core machine
(onnxruntime 1.32, qlnet50 stage shapes, batch 1): 1.72 -> 1.21 ms (256 ch @56x56), 0.90 -> 0.66 ms
(512 @28x28), 0.30 -> 0.25 ms (512 @14x14), 0.25 -> 0.18 ms (1024 @7x7), the repeat included.
Contract: equivalent (the same products and sums; a different kernel may round differently).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qlfx import ir
from qlfx.pass_manager import Pass, PassContext, PassResult, Skip, register_pass

REPEAT_INTERLEAVE = torch.ops.aten.repeat_interleave.self_int


@register_pass
class ExpandDepthwise(Pass):
    name = "expand-depthwise"
    description = "depthwise conv with channel multiplier m>1 -> repeat input channels m times + pure depthwise conv"
    contract = "equivalent"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        for node in list(gm.graph.nodes):
            conv = ir.ConvCall.of(node)
            if conv is None:
                continue
            in_shape, w_shape = ir.shape(conv.input), ir.shape(conv.weight)
            if in_shape is None or w_shape is None or len(in_shape) != 4:
                continue
            channels, groups, outputs = in_shape[1], conv.groups, w_shape[0]
            if groups != channels or groups == 1 or outputs == groups:
                continue  # not depthwise, or already a pure depthwise conv
            if outputs % groups:
                result.skipped.append(Skip(node.name, f"{outputs} outputs are not a multiple of {groups} groups"))
                continue
            if not ctx.allow_rewrite():
                break
            multiplier = outputs // groups
            with gm.graph.inserting_before(node):
                repeated = ir.call(gm, REPEAT_INTERLEAVE, (conv.input, multiplier, 1), like=node)
            conv.set_args(input=repeated, groups=outputs)
            result.changed = True
            result.rewrites.append(f"{node.name}: multiplier {multiplier} over {groups} channels")
        return result
