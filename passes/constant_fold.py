"""constant-fold: evaluate, once, every computation whose inputs are all stored constants.

Example: the paper's shared 3x3 kernel ``w.repeat(C, 1, 1, 1)`` becomes one stored [kC, 1, 3, 3]
tensor. Exact: the folded value is what the graph computed at run time, bit for bit. Random ops and
in-place ops are never folded.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qlfx import ir
from qlfx.pass_manager import Pass, PassContext, PassResult, register_pass

_RANDOM = {"rand", "randn", "rand_like", "randn_like", "randint", "dropout", "bernoulli", "normal", "multinomial"}


def _foldable(node: fx.Node, constant: set[fx.Node]) -> bool:
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in _RANDOM or name.endswith("_"):
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(i in constant for i in inputs)


@register_pass
class ConstantFold(Pass):
    name = "constant-fold"
    description = "precompute values that depend only on weights (e.g. repeated shared kernels)"
    contract = "exact"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        constant = {n for n in gm.graph.nodes if n.op == "get_attr"}
        env: dict[fx.Node, object] = {n: ir.get_tensor(gm, n) for n in constant}
        for node in list(gm.graph.nodes):
            if not _foldable(node, constant):
                continue
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            with torch.no_grad():
                if node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    value = node.target(*args, **kwargs)
            env[node] = value
            constant.add(node)
            if not isinstance(value, torch.Tensor):
                continue  # e.g. a size tuple: kept in env so later nodes can fold
            if not all(u in constant or _foldable(u, constant | {node}) for u in node.users) or not node.users:
                if not ctx.allow_rewrite():
                    break
                with gm.graph.inserting_before(node):
                    folded = ir.constant_node(gm, value, f"{node.name}_folded")
                ir.replace_value(node, folded)
                result.changed = True
                result.rewrites.append(node.name)
        # Nodes whose every user was folded are now dead; dce removes them.
        for node in reversed(list(gm.graph.nodes)):
            if node in constant and node.op != "get_attr" and not node.users:
                gm.graph.erase_node(node)
        return result
